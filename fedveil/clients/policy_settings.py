"""The site policy's settings table: ``fedveil client`` flags and the ``--policy`` TOML file.

The same machinery as the job's settings (:class:`fedveil.settings_table.SettingsTable`): one list
of the :class:`~fedveil.clients.policy.SitePolicy` fields a file or a flag may set, so a file key, a
flag and the field an error names are always the same setting. A policy file holds a ``[policy]``
table, or the same keys at its top level; the pinned authority and its revocations come from their
own files (``--authority``, ``--revocations``), never from the policy file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedveil.clients.policy import PolicyError, SitePolicy
from fedveil.settings_table import Setting, SettingsTable
from fedveil.settings_table import setting as _s

POLICY_SETTINGS: tuple[Setting, ...] = (
    _s("trust_server", "policy"), _s("min_cohort", "policy"), _s("max_corrupt_fraction", "policy"),
    Setting("allowed_dp_modes", "policy", "--allow-dp", param="allow_dp"),
    _s("min_noise_multiplier", "policy"), _s("max_attempts_per_round", "policy"),
    _s("max_evaluations_per_round", "policy"), _s("max_evaluations_per_job", "policy"),
    _s("evaluation", "policy"), _s("security_bits", "policy"),
)
"""Every policy setting a ``--policy`` file or a ``fedveil client`` flag can give."""

POLICY_TABLE = SettingsTable(SitePolicy, POLICY_SETTINGS, lambda message: PolicyError("policy", message),
                             bare_section="policy")


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """The policy settings a TOML file gives, checked key by key (errors name ``policy.key``)."""
    return POLICY_TABLE.load_file(path)


def policy_file_text(policy: SitePolicy) -> str:
    """A policy file holding ``policy``'s settings (the inverse of :func:`load_policy_file`)."""
    return POLICY_TABLE.file_text(policy)


def policy_flag(field: str) -> str | None:
    """The ``fedveil client`` flag that sets a policy field (None: no flag does)."""
    return POLICY_TABLE.flag_of(field)
