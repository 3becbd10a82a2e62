"""One table of a job's settings, used in both directions: ``fedveil server`` flags → a
:class:`~fedveil.server.config.ServerConfig`, a config → the flags that rebuild it (how the process
simulation starts its server), and a job file (``fedveil server --config job.toml``) → the same
fields, with flags on the command line overriding the file.

A job file groups the settings in sections named for the part of the job they set::

    [job]
    task = "fedveil.tasks.synthetic:task"
    rounds = 20
    clients_per_round = 10

    [privacy]
    dp = "central"
    dp_clip = 1.0
    dp_noise_multiplier = 1.1

    [secagg]
    secagg = "harary"

Keys are the config's field names; an unknown section or key, or a value of the wrong type, is
refused with an error naming ``section.key``. The machinery is :class:`fedveil.settings_table.SettingsTable`,
shared with the site policy (``fedveil client --policy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedveil.errors import FedveilError
from fedveil.server.config import ServerConfig, flat_types
from fedveil.settings_table import Setting, SettingsTable
from fedveil.settings_table import setting as _s


class JobFileError(FedveilError, ValueError):
    """A job file cannot be read or holds an unknown key or a value of the wrong type; ``field``
    is ``config`` (the file) and the message names ``section.key``."""


SETTINGS: tuple[Setting, ...] = (
    _s("task", "job"), Setting("model", "job", "--model", param="model_file"),
    _s("rounds", "job"), _s("clients_per_round", "job"), _s("min_clients", "job"),
    _s("seed", "job"), _s("insecure_deterministic", "job"),
    _s("round_timeout", "schedule"), _s("stage_timeout", "schedule"), _s("cohort_wait", "schedule"),
    _s("linger", "schedule"), _s("poll_wait", "schedule"), _s("max_round_attempts", "schedule"),
    _s("secagg", "secagg"), _s("secagg_degree", "secagg"), _s("threshold", "secagg"),
    _s("expected_dropout", "secagg"), _s("max_corrupt_fraction", "secagg"), _s("ring_bits", "secagg"),
    _s("clip_range", "secagg"), _s("max_weight", "secagg"),
    Setting("weighted", "secagg", "--weighting", param="weighting", choices=("examples", "uniform")),
    Setting("active_adversary", "secagg", "--active-adversary", off_flag="--passive"),
    _s("dp", "privacy"), _s("dp_clip", "privacy"), _s("dp_noise_multiplier", "privacy"),
    _s("dp_adaptive_clipping", "privacy"), _s("dp_target_quantile", "privacy"), _s("dp_delta", "privacy"),
    _s("dp_epsilon_budget", "privacy"), _s("dp_client_epsilon_budget", "privacy"), _s("dp_accountant", "privacy"),
    _s("dp_sampling_amplification", "privacy", off_flag="--no-dp-sampling-amplification"),
    _s("dp_bits", "privacy"), _s("dp_mechanism", "privacy"), _s("dp_local_noise_multiplier", "privacy"),
    _s("dp_local_max_grad_norm", "privacy"), _s("dp_local_target_epsilon", "privacy"),
    _s("optimizer", "training"), _s("server_lr", "training"), _s("local_epochs", "training"),
    _s("learning_rate", "training"), _s("batch_size", "training"),
    Setting("evaluate", "evaluation", "--no-evaluate", param="no_evaluate", negated=True),
    Setting("final_evaluation", "evaluation", "--no-final-evaluation", param="no_final_evaluation", negated=True),
    _s("evaluation", "evaluation"), _s("max_evaluations_per_job", "evaluation"),
)
"""Every setting a job file or a ``fedveil server`` flag can give, in the order of ``--help``."""

JOB_SETTINGS = SettingsTable(ServerConfig, SETTINGS, lambda message: JobFileError(message, field="config"),
                             field_types=flat_types(), values_of=ServerConfig.to_dict)
SECTIONS = JOB_SETTINGS.sections


def fields_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The config fields the parsed ``fedveil server`` options give (``options``: click's params)."""
    return JOB_SETTINGS.fields_from_options(options)


def command_line(config: ServerConfig) -> list[str]:
    """The ``fedveil server`` flags that rebuild ``config``'s settings (floats in full precision)."""
    return JOB_SETTINGS.command_line(config)


def load_job_file(path: str | Path) -> dict[str, Any]:
    """The config fields a job file sets (see the module docstring), checked key by key."""
    return JOB_SETTINGS.load_file(path)


def job_file_text(config: ServerConfig) -> str:
    """A job file holding ``config``'s settings (the inverse of :func:`load_job_file`)."""
    return JOB_SETTINGS.file_text(config)


def config_fields(config: ServerConfig) -> dict[str, Any]:
    """The fields of ``config`` the table covers (the rest come from other flags, e.g. ``--authority``)."""
    return JOB_SETTINGS.config_fields(config)
