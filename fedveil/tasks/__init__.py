"""Built-in tasks.

``fedveil.tasks.synthetic`` is a small task for tests, simulations and benchmarks: logistic
regression (``fedveil.tasks.synthetic:task``) or a small MLP (``fedveil.tasks.synthetic:mlp``)
on generated data, so a federation can run without any data files. The healthcare task comes
with the demo.
"""
