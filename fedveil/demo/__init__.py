"""The healthcare demo: WDBC breast-cancer risk, trained across hospitals with local DP-SGD.

- :mod:`fedveil.demo.data` — the fixed split (test set, validation folds, non-IID hospitals)
  and the public reference ranges used to scale features;
- :mod:`fedveil.demo.healthcare` — the task (``fedveil.demo.healthcare:task``), the model and
  the clinician's risk assessment;
- :mod:`fedveil.demo.recipe` — the tuned hyper-parameters;
- :mod:`fedveil.demo.federation` — one run of the federation through the job runner and the real clients;
- :mod:`fedveil.demo.split_runs` — that run on one split, scored (baselines, tuning, benchmarks);
- :mod:`fedveil.demo.tuning` — the cross-validated search that chose the recipe.
"""
