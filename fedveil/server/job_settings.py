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
refused with an error naming ``section.key``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fedveil.errors import FedveilError
from fedveil.server.config import ServerConfig


class JobFileError(FedveilError, ValueError):
    """A job file cannot be read or holds an unknown key or a value of the wrong type; ``field``
    is ``config`` (the file) and the message names ``section.key``."""


@dataclass(frozen=True)
class Setting:
    """One config field: its job-file section, its ``fedveil server`` parameter and flags."""

    field: str
    section: str
    flag: str
    param: str = ""
    """The click parameter name (default: the field)."""
    off_flag: str | None = None
    """A boolean's flag for False (``--passive``); None: False is the flag's absence."""
    negated: bool = False
    """The flag sets the field to False (``--no-evaluate``)."""
    choices: tuple[str, str] | None = None
    """A boolean given as a choice: (value for True, value for False)."""

    @property
    def parameter(self) -> str:
        return self.param or self.field


def _s(field: str, section: str, **kw: Any) -> Setting:
    return Setting(field, section, "--" + field.replace("_", "-"), **kw)


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

SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_BY_FIELD = {s.field: s for s in SETTINGS}
_FIELD_TYPES = typing.get_type_hints(ServerConfig)


def fields_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the parsed ``fedveil server`` options give (``options``: click's params)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value = options[s.parameter]
        if s.choices is not None:
            value = value == s.choices[0]
        elif s.negated:
            value = not value
        out[s.field] = value
    return out


def command_line(config: ServerConfig) -> list[str]:
    """The ``fedveil server`` flags that rebuild ``config``'s settings (floats in full precision)."""
    argv: list[str] = []
    for s in SETTINGS:
        value = getattr(config, s.field)
        if s.choices is not None:
            argv += [s.flag, s.choices[0] if value else s.choices[1]]
        elif isinstance(value, bool):
            if s.negated:
                argv += [] if value else [s.flag]
            elif value:
                argv.append(s.flag)
            elif s.off_flag is not None:
                argv.append(s.off_flag)
        elif value is not None and value != "":
            argv += [s.flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def _check_type(where: str, field: str, value: Any) -> Any:
    kinds = tuple(k for k in (typing.get_args(_FIELD_TYPES[field]) or (_FIELD_TYPES[field],))
                  if isinstance(k, type) and k is not type(None))
    expected = " or ".join(k.__name__ for k in kinds)
    if isinstance(value, bool) and bool not in kinds:
        raise JobFileError(f"{where}: expected {expected}, got a boolean", field="config")
    if isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
        return float(value)
    if not isinstance(value, kinds):
        raise JobFileError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}", field="config")
    return value


def load_job_file(path: str | Path) -> dict[str, Any]:
    """The config fields a job file sets (see the module docstring), checked key by key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise JobFileError(f"cannot read {str(p)!r}: {err.strerror or err}", field="config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise JobFileError(f"{str(p)!r} is not valid TOML: {err}", field="config") from None
    out: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise JobFileError(f"{section}: unknown section (expected one of {', '.join(SECTIONS)})",
                               field="config")
        for key, value in table.items():
            setting = _BY_FIELD.get(key)
            if setting is None or setting.section != section:
                known = ", ".join(s.field for s in SETTINGS if s.section == section)
                raise JobFileError(f"{section}.{key}: unknown key (section {section} takes {known})", field="config")
            out[key] = _check_type(f"{section}.{key}", key, value)
    return out


def job_file_text(config: ServerConfig) -> str:
    """A job file holding ``config``'s settings (the inverse of :func:`load_job_file`)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for s in (s for s in SETTINGS if s.section == section):
            value = getattr(config, s.field)
            if value is None:
                continue
            lines.append(f"{s.field} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def config_fields(config: ServerConfig) -> dict[str, Any]:
    """The fields of ``config`` the table covers (the rest come from other flags, e.g. ``--authority``)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in _BY_FIELD}
