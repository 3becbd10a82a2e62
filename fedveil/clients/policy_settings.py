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

from fedveil.clients.policy import DP_MODES, EVALUATION_RULES, PolicyError, SitePolicy
from fedveil.dp.events import ACCOUNTANTS
from fedveil.settings_table import Setting, SettingsTable
from fedveil.settings_table import setting as _s

POLICY_SETTINGS: tuple[Setting, ...] = (
    _s("trust_server", "policy",
       help="Opt in to trusting the server (honest-but-curious, passive secure aggregation)."),
    _s("min_cohort", "policy", show_default=True, help="Fewest cohort members of a round this site joins."),
    _s("max_corrupt_fraction", "policy", default_label="1/3",
       help="Fraction of a cohort this site assumes may collude with the server."),
    Setting("allowed_dp_modes", "policy", "--allow-dp", param="allow_dp", values=DP_MODES,
            help="A DP mode this site accepts (repeat; default: all)."),
    _s("min_noise_multiplier", "policy",
       help="User-level noise floor (multiple of the clip norm) this site requires of released sums."),
    _s("max_attempts_per_round", "policy", show_default=True, help="Attempts of one round this site joins."),
    _s("max_evaluations_per_round", "policy", show_default=True,
       help="Evaluations of received models per round number this site answers."),
    _s("max_evaluations_per_job", "policy", show_default=True,
       help="Evaluation requests of one job this site answers (evaluation-only rounds, final evaluation)."),
    _s("evaluation", "policy", values=EVALUATION_RULES, show_default=True,
       help="Evaluation rule: secure sums only, per-site metrics in the clear, or off."),
    _s("evaluate_under_local_dp", "policy",
       help="Evaluate on this site's data in jobs with local DP too, whose DP-SGD ε does not cover evaluation."),
    _s("security_bits", "policy", show_default=True,
       help="σ of the SecAgg+ collusion bound this site requires (failure probability 2^-σ)."),
    _s("max_local_epochs", "policy", show_default=True,
       help="Most local epochs of one round this site trains (a round asking for more is declined)."),
    _s("max_local_delta", "policy", show_default=True,
       help="Largest local-DP (DP-SGD) δ this site accepts; δ >= 1/(its records) is refused too."),
    _s("max_local_epsilon", "policy", show_default=True,
       help="This site's own DP-SGD ε budget: a larger job target is refused, and no round takes its ε past it."),
    _s("min_local_noise_multiplier", "policy",
       help="Least DP-SGD noise multiplier this site trains with (fixed, or what a target solves to)."),
    _s("max_lifetime_local_epsilon", "policy", show_default=True,
       help="Cap on this site's DP-SGD ε over every job it joins (from its --state file; 0: no cap)."),
    Setting("local_accountants", "policy", "--allow-local-accountant", param="allow_local_accountant",
            values=ACCOUNTANTS, help="An accountant a job may pick for this site's DP-SGD (repeat; default: all)."),
    _s("max_user_epsilon", "policy",
       help="Cap on this site's user-level ε over every release it records (0: no cap; releases without "
            "user-level noise it can rely on are then declined)."),
)
"""Every policy setting a ``--policy`` file or a ``fedveil client`` flag can give (the flags are built from
this table, their defaults shown from :class:`SitePolicy`'s)."""

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
