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
refused with an error naming ``section.key`` (``fedveil server`` names a value out of range the
same way). The machinery is :class:`fedveil.settings_table.SettingsTable`,
shared with the site policy (``fedveil client --policy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedveil.errors import FedveilError
from fedveil.server.config import (
    ACCOUNTANTS,
    DISTRIBUTED_MECHANISMS,
    DP_MODES,
    EVALUATION_MODES,
    GRAPHS,
    OPTIMIZERS,
    ServerConfig,
    flat_defaults,
    flat_types,
)
from fedveil.settings_table import Setting, SettingsTable
from fedveil.settings_table import setting as _s


class JobFileError(FedveilError, ValueError):
    """A job file cannot be read or holds an unknown key or a value of the wrong type; ``field``
    is ``config`` (the file) and the message names ``section.key``."""


SETTINGS: tuple[Setting, ...] = (
    _s("task", "job", help="The task, module:attr (e.g. fedveil.tasks.synthetic:task), for turnkey CSV clients; "
                           "loop jobs give --model instead."),
    Setting("model", "job", "--model", param="model_file",
            help="The job's model file (names, shapes, dtypes, initial values; fedveil.save_initial_model or "
                 "fedveil init-model): the server imports no user code."),
    _s("rounds", "job", help="Number of rounds.  [required]"),
    _s("clients_per_round", "job", help="Cohort size K.  [required]"),
    _s("min_clients", "job", help="Smallest cohort M to start a round.", default_label="K"),
    _s("seed", "job", help="Job seed (initial model, cohort sampling, round seeds). DP noise never uses it."),
    _s("insecure_deterministic", "job",
       help="Derive round nonces from --seed (tests and bit-for-bit simulations only)."),
    _s("round_timeout", "schedule", help="Seconds for training and key advertisement.", show_default=True),
    _s("stage_timeout", "schedule", help="Seconds for each later secure-aggregation stage.", show_default=True),
    _s("cohort_wait", "schedule",
       help="Seconds to wait for K clients once M are connected (none when no other enrolled client may be drawn).",
       show_default=True),
    _s("linger", "schedule", help="Seconds to keep serving after the job so clients learn it is done.",
       show_default=True),
    _s("poll_wait", "schedule", help="Longest a client's long poll is held, in seconds.", show_default=True),
    _s("max_round_attempts", "schedule", show_default=True),
    _s("secagg", "secagg", values=GRAPHS, show_default=True),
    _s("secagg_degree", "secagg", help="Harary graph degree (0: derive)."),
    _s("threshold", "secagg", help="Secure-aggregation threshold t (0: the smallest t with 2t > h + c; an explicit t "
                                   "must satisfy it with --active-adversary, and t > c without)."),
    _s("expected_dropout", "secagg", show_default=True),
    _s("max_corrupt_fraction", "secagg", default_label="1/3",
       help="Fraction of a cohort the server may control (colluding clients), in [0, 0.5); sets c in 2t > h + c."),
    _s("ring_bits", "secagg", show_default=True),
    _s("clip_range", "secagg", show_default=True,
       help="Per-coordinate clip of updates before fixed-point encoding (without user-level DP)."),
    _s("max_weight", "secagg", show_default=True),
    Setting("weighted", "secagg", "--weighting", param="weighting", choices=("examples", "uniform"),
            show_default=True, help="Weight clients by their number of examples (off under user-level DP)."),
    Setting("active_adversary", "secagg", "--active-adversary", off_flag="--passive", show_default=True,
            help="Malicious-server protections (signed keys, consistency check, authority-vouched identities; "
                 "needs --authority), or "
                 "passive (honest-but-curious) secure aggregation, which only sites that opt in to trusting the "
                 "server (fedveil client --trust-server) join."),
    _s("dp", "privacy", values=DP_MODES, show_default=True, help="Differential privacy mode."),
    _s("dp_clip", "privacy", show_default=True,
       help="User-level L2 clip norm S of each client's update (central, distributed)."),
    _s("dp_noise_multiplier", "privacy", show_default=True, help="Noise multiplier z of the user-level mechanism."),
    _s("dp_adaptive_clipping", "privacy", help="Adaptive clipping (Andrew et al. 2021; central)."),
    _s("dp_target_quantile", "privacy", show_default=True),
    _s("dp_delta", "privacy", show_default=True),
    _s("dp_epsilon_budget", "privacy", help="Stop before the federation ε exceeds this."),
    _s("dp_client_epsilon_budget", "privacy", help="Per-client sample-level ε budget (local DP)."),
    _s("dp_accountant", "privacy", values=ACCOUNTANTS, show_default=True),
    _s("dp_sampling_amplification", "privacy", off_flag="--no-dp-sampling-amplification", show_default=True,
       help="Central DP: account each round as a cohort of K drawn without replacement from the N sites connected "
            "at the draw (replace-one relation, rdp accountant) instead of as the plain Gaussian (q = 1). Off by "
            "default: amplification needs random availability and participant lists nobody sees, and the "
            "operator, the dashboard and every cohort member see them."),
    _s("dp_bits", "privacy", show_default=True, help="Distributed DP: ring bit width b."),
    _s("dp_mechanism", "privacy", values=DISTRIBUTED_MECHANISMS, show_default=True, help="Distributed DP noise."),
    _s("dp_local_noise_multiplier", "privacy", show_default=True, help="Local DP-SGD noise multiplier."),
    _s("dp_local_max_grad_norm", "privacy", show_default=True),
    _s("dp_local_target_epsilon", "privacy", help="Local DP-SGD: solve the noise for this ε over the job instead."),
    _s("optimizer", "training", values=OPTIMIZERS, show_default=True),
    _s("server_lr", "training", show_default=True),
    _s("local_epochs", "training", help="Local epochs per round (0: the task's default)."),
    _s("learning_rate", "training", help="Client learning rate (0: the task's default)."),
    _s("batch_size", "training", help="Client batch size (0: the task's default)."),
    Setting("evaluate", "evaluation", "--no-evaluate", param="no_evaluate", negated=True,
            help="Skip the cohort's evaluation of each global model."),
    Setting("final_evaluation", "evaluation", "--no-final-evaluation", param="no_final_evaluation", negated=True,
            help="Skip the evaluation of the final model."),
    _s("evaluation", "evaluation", values=EVALUATION_MODES, show_default=True,
       help="Federated evaluation: as secure sums over the cohort, per site in the clear (only sites whose policy "
            "allows it answer), or off. Off under user-level DP."),
    _s("evaluate_under_local_dp", "evaluation",
       help="Under local DP, ask the sites to evaluate anyway. Off by default: DP-SGD's ε covers training only, "
            "so a site evaluates under local DP only when its own policy opts in too (evaluate_under_local_dp)."),
    _s("max_evaluations_per_job", "evaluation", show_default=True,
       help="Evaluation requests (evaluation-only rounds and their attempts, the final evaluation) the job sends; "
            "sites answer at most their own policy's cap (0: no final evaluation)."),
)
"""Every setting a job file or a ``fedveil server`` flag can give, in the order of ``--help`` (their click
options are built from this table: :mod:`fedveil.commands.setting_options`)."""

JOB_SETTINGS = SettingsTable(ServerConfig, SETTINGS, lambda message: JobFileError(message, field="config"),
                             field_types=flat_types(), defaults=flat_defaults(), values_of=ServerConfig.to_dict)
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
