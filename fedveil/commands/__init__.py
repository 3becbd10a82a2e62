"""CLI command groups. Each module defines ``register(app)`` and is listed in ``fedveil.cli``.

Commands do the I/O (argument parsing, printing, files); the logic they call lives in the
pure packages (``secagg``, ``dp``) or in ``server``/``clients``/``protocol``.
"""
