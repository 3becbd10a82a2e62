"""A site's own security policy: what it requires of every round before it sends anything.

The aggregation server is not trusted by default (DESIGN.md, "Security model"): it may deviate
from the protocol and control a fraction of the sites. Everything a ``RoundStart`` carries — the
cohort, the identity keys, n, t, the graph, the DP parameters — is therefore checked against what
the site itself holds: this policy, the consortium authority's public key it pinned, and the
``JobInfo`` of the job it joined. A round that breaks the policy is declined before anything
about the site's data leaves it (the one-line reason is logged and sent as the decline).

Secure by default: a site that configures nothing requires active-adversary mode with identities
vouched for by an authority that is not the server. Trusting the server (Bonawitz et al.'s
honest-but-curious setting) is an explicit opt-in, ``trust_server=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedveil.dp.events import ACCOUNTANTS
from fedveil.dp.ledger import BudgetExceededError
from fedveil.errors import FedveilError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.errors import SecAggError
from fedveil.secagg.identity import RevocationList
from fedveil.secagg.signed_roster import SignedRoster, verify_signed_roster
from fedveil.secagg.threshold import DEFAULT_MAX_CORRUPT_FRACTION, DEFAULT_SECURITY_BITS

DP_MODES = ("none", "local", "central", "distributed")
EVALUATION_RULES = ("secure", "clear", "off")
DEFAULT_MIN_COHORT = 3
DEFAULT_MAX_LOCAL_EPOCHS = 100
DEFAULT_MAX_LOCAL_DELTA = 1e-5
DEFAULT_MAX_LOCAL_EPSILON = 10.0
DEFAULT_MAX_LIFETIME_LOCAL_EPSILON = 3 * DEFAULT_MAX_LOCAL_EPSILON
"""Three jobs at the per-job default: bounds a server that starts job after job, rarely an honest site."""


class PolicyError(FedveilError, ValueError):
    """A policy setting is invalid (``field`` names it: a TOML key, flag or argument)."""

    field: str

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message


class PolicyViolation(FedveilError):
    """A round breaks this site's policy; ``field`` names the RoundStart field at fault."""

    field: str

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message


class TrainingRefused(PolicyViolation, BudgetExceededError):
    """A round's training or local-DP parameters break this site's policy, found when the loop
    privatizes its objects (:meth:`fedveil.clients.round.Round.privatize`), before any step.

    ``field`` names the ``RoundStart`` field at fault. It is a :class:`BudgetExceededError` too, so
    every loop that declines a round its privacy budget cannot afford (``run_client``, the loop of
    docs/federate-your-loop.md) declines this one the same way, before training: the site cannot
    vouch for the ε such a round would spend. Its figures: ``epsilon_before`` is what the site has
    spent, ``epsilon_after`` is ∞ (unknown), ``budget`` the site's own.
    """

    def __init__(self, field_name: str, message: str, *, round_index: int = 0, epsilon: float = 0.0,
                 budget: float = math.inf, delta: float = DEFAULT_MAX_LOCAL_DELTA) -> None:
        FedveilError.__init__(self, f"{field_name}: {message}")
        self.field = field_name
        self.detail = message
        self.party = "site"
        self.round_index = round_index
        self.epsilon_before = epsilon
        self.epsilon_after = math.inf
        self.budget = budget
        self.delta = delta


class UserBudgetExceeded(PolicyViolation):
    """A release this site declines because its ``max_user_epsilon`` cannot afford it: a spent
    budget, so every later release of the job is declined too."""


@dataclass(frozen=True)
class SitePolicy:
    """What this site requires of a round (see the module docstring).

    Attributes:
        trust_server: opt in to the honest-but-curious server model (passive secure aggregation,
            identities not checked). Off by default.
        authority_public_key: the consortium authority's Ed25519 public key (32 bytes), pinned by
            the site; every cohort member's identity must carry its credential. Required unless
            ``trust_server``.
        consortium: the authority's consortium name; credentials of another consortium are refused.
        revocations: the authority's latest signed revocation list the site holds (optional; a
            newer one may come from the server, never an older one).
        roster: a roster the authority signed offline (``fedveil authority roster``; optional). It
            is checked once, here, and the credentials it lists then cost a lookup in a round
            instead of a signature and a key check (:mod:`fedveil.secagg.signed_roster`).
        min_cohort: fewest cohort members (n) of a round this site takes part in.
        max_corrupt_fraction: the fraction f of the cohort this site assumes may collude with the
            server; thresholds must satisfy 2t > h + c for the c it implies
            (:mod:`fedveil.secagg.threshold`).
        allowed_dp_modes: the DP modes the site accepts.
        min_noise_multiplier: the user-level noise the site requires of a released sum, as a
            multiple of the clip norm, counting only noise it can rely on. With distributed DP the
            site tops up its own noise share to meet it; central DP needs ``trust_server`` (the site
            cannot check noise the server adds).
        max_attempts_per_round: attempts of one round this site joins (each aborted attempt gives
            the server another look at a fresh layout; retries after unmasking are always declined).
        evaluation: ``"secure"`` (metrics only as secure sums), ``"clear"`` (per-site metrics,
            only if the server asks for them too) or ``"off"``.
        evaluate_under_local_dp: evaluate on this site's data in jobs with local (sample-level) DP,
            whose DP-SGD ε does not cover evaluation queries. Off by default: such a site
            declines any round that asks it for evaluation sums (never adding zeros).
        max_evaluations_per_round: evaluations of received models per round number.
        max_evaluations_per_job: evaluation requests of one job this site answers (evaluation-only
            rounds, per-site final evaluations); each is a query on its data the server chose.
        security_bits: σ for the Harary collusion bound (failure probability 2^-σ).
        max_local_epochs: most local epochs (``training.local_epochs``) of one round this site
            trains, in every DP mode: a server cannot make it burn unbounded CPU.
        max_local_delta: the largest δ this site accepts for its sample-level (DP-SGD) guarantee;
            a round whose ``dp.local.delta`` is above it, or at least 1/(the site's records), is
            refused. Its ε is accounted and reported at the job's δ, so never at a looser one.
        max_local_epsilon: this site's own sample-level ε budget (at that δ): a job target
            (``dp.local.target_epsilon``) above it is refused, and in every local-DP job a round
            that would take the site's accounted ε past min(target, this) is declined.
        min_local_noise_multiplier: the least DP-SGD noise multiplier this site trains with: a
            fixed ``dp.local.noise_multiplier`` below it, or a target that solves to less, is
            refused (0: no floor; ``max_local_epsilon`` still bounds the spend).
        max_lifetime_local_epsilon: a cap on the site's sample-level ε over every job it takes part
            in (its saved DP-SGD steps, RDP at its ledger's δ): ``max_local_epsilon`` bounds one job,
            and a server could start job after job. Default 30 (three jobs at the per-job default);
            0: no cap. Needs the site's ``--state`` file to count earlier jobs (without one, only the
            running process's).
        local_accountants: the accountants this site lets a job's ``dp.local.accountant`` pick for its
            DP-SGD (default: all three, each an upper bound on ε; a site whose rules name one, e.g.
            RDP for an audit that re-derives its figures, lists only that one).
        max_user_epsilon: a cap on the site's user-level ε (its whole update; at its ledger's δ) over
            every release its ledger records, from the noise it can rely on: a round whose release
            would take that ε past the cap is declined before training, and so is any release with
            no user-level noise the site can rely on (DP modes ``none`` and ``local``, central DP
            without ``trust_server``), whose ε is unbounded. ``min_noise_multiplier`` bounds one
            release; a server can ask for as many as the rounds it announces, and job after job.
            0: no cap (default). Counts earlier jobs from the site's ``--state`` file.
    """

    trust_server: bool = False
    authority_public_key: bytes | None = None
    consortium: str | None = None
    revocations: RevocationList | None = None
    roster: SignedRoster | None = None
    min_cohort: int = DEFAULT_MIN_COHORT
    max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION
    allowed_dp_modes: frozenset[str] = field(default_factory=lambda: frozenset(DP_MODES))
    min_noise_multiplier: float = 0.0
    max_attempts_per_round: int = 3
    evaluation: str = "secure"
    evaluate_under_local_dp: bool = False
    max_evaluations_per_round: int = 1
    max_evaluations_per_job: int = 1
    security_bits: float = DEFAULT_SECURITY_BITS
    max_local_epochs: int = DEFAULT_MAX_LOCAL_EPOCHS
    max_local_delta: float = DEFAULT_MAX_LOCAL_DELTA
    max_local_epsilon: float = DEFAULT_MAX_LOCAL_EPSILON
    min_local_noise_multiplier: float = 0.0
    max_lifetime_local_epsilon: float = DEFAULT_MAX_LIFETIME_LOCAL_EPSILON
    local_accountants: frozenset[str] = field(default_factory=lambda: frozenset(ACCOUNTANTS))
    max_user_epsilon: float = 0.0
    roster_marks: frozenset[bytes] = field(default=frozenset(), init=False, repr=False, compare=False)
    """The roster's credentials, as marks for the site's cache of vouched credentials."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise PolicyError(name, f"{message} (got {getattr(self, name)!r})")

        need(isinstance(self.trust_server, bool), "trust_server", "must be true or false")
        need(isinstance(self.evaluate_under_local_dp, bool), "evaluate_under_local_dp", "must be true or false")
        key = self.authority_public_key
        need(key is None or (isinstance(key, bytes) and len(key) == 32), "authority_public_key",
             "must be the authority's 32-byte Ed25519 public key")
        need(isinstance(self.min_cohort, int) and not isinstance(self.min_cohort, bool) and self.min_cohort >= 2,
             "min_cohort", "must be an integer >= 2")
        need(_is_number(self.max_corrupt_fraction) and 0 <= self.max_corrupt_fraction < 0.5,
             "max_corrupt_fraction", "must be in [0, 0.5)")
        modes = self.allowed_dp_modes
        need(isinstance(modes, frozenset) and bool(modes) and modes <= set(DP_MODES), "allowed_dp_modes",
             f"must be a non-empty subset of {', '.join(DP_MODES)}")
        need(_is_number(self.min_noise_multiplier) and 0 <= self.min_noise_multiplier < 1e6, "min_noise_multiplier",
             "must be a finite number >= 0")
        need(isinstance(self.max_attempts_per_round, int) and not isinstance(self.max_attempts_per_round, bool)
             and 1 <= self.max_attempts_per_round <= 100, "max_attempts_per_round", "must be an integer in 1..100")
        need(self.evaluation in EVALUATION_RULES, "evaluation", f"must be one of {', '.join(EVALUATION_RULES)}")
        need(isinstance(self.max_evaluations_per_round, int) and not isinstance(self.max_evaluations_per_round, bool)
             and 0 <= self.max_evaluations_per_round <= 100, "max_evaluations_per_round",
             "must be an integer in 0..100")
        need(isinstance(self.max_evaluations_per_job, int) and not isinstance(self.max_evaluations_per_job, bool)
             and 0 <= self.max_evaluations_per_job <= 1000, "max_evaluations_per_job",
             "must be an integer in 0..1000")
        need(_is_number(self.security_bits) and 10 <= self.security_bits <= 128, "security_bits",
             "must be between 10 and 128")
        need(isinstance(self.max_local_epochs, int) and not isinstance(self.max_local_epochs, bool)
             and 1 <= self.max_local_epochs <= 10_000, "max_local_epochs", "must be an integer in 1..10000")
        need(_is_number(self.max_local_delta) and 0 < self.max_local_delta < 1, "max_local_delta",
             "must be a number in (0, 1)")
        need(_is_number(self.max_local_epsilon) and self.max_local_epsilon > 0, "max_local_epsilon",
             "must be a finite number > 0")
        need(_is_number(self.min_local_noise_multiplier) and 0 <= self.min_local_noise_multiplier < 1e6,
             "min_local_noise_multiplier", "must be a finite number >= 0")
        need(_is_number(self.max_lifetime_local_epsilon) and self.max_lifetime_local_epsilon >= 0,
             "max_lifetime_local_epsilon", "must be a finite number >= 0 (0: no cap)")
        need(_is_number(self.max_user_epsilon) and self.max_user_epsilon >= 0,
             "max_user_epsilon", "must be a finite number >= 0 (0: no cap)")
        accountants = self.local_accountants
        need(isinstance(accountants, frozenset) and bool(accountants) and accountants <= set(ACCOUNTANTS),
             "local_accountants", f"must be a non-empty subset of {', '.join(ACCOUNTANTS)}")
        if not self.trust_server and self.authority_public_key is None:
            raise PolicyError("authority_public_key", "a site that does not trust the server must pin the consortium "
                              "authority's public key (fedveil authority init; --authority), or opt in to "
                              "trusting the server (--trust-server)")
        if self.min_noise_multiplier > 0 and not self.trust_server and "central" in modes:
            # central noise is added by the server: a floor the site cannot check is no floor
            object.__setattr__(self, "allowed_dp_modes", frozenset(modes - {"central"}))
        if self.revocations is not None and self.consortium is not None \
                and self.revocations.consortium != self.consortium:
            raise PolicyError("revocations", f"the revocation list is for consortium {self.revocations.consortium!r}, "
                              f"not {self.consortium!r}")
        if self.roster is not None:
            if self.authority_public_key is None:
                raise PolicyError("roster", "a signed roster needs the authority's public key it is checked against "
                                  "(--authority)")
            try:
                marks = verify_signed_roster(self.authority_public_key, self.roster,
                                             consortium=self.consortium or self.roster.consortium)
            except SecAggError as err:
                raise PolicyError("roster", f"not vouched for by this site's authority: {err}") from None
            object.__setattr__(self, "roster_marks", marks)

    # -- building ----------------------------------------------------------------------------
    def with_authority(self, **changes: Any) -> SitePolicy:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for logs: the settings that matter for a round."""
        if self.trust_server:
            trust = "trusting the server (passive)"
        else:
            trust = f"malicious-server defaults (authority pinned, f={self.max_corrupt_fraction:.3g})"
        return (f"{trust}; min cohort {self.min_cohort}; DP modes {','.join(sorted(self.allowed_dp_modes))}; "
                f"noise floor z>={self.min_noise_multiplier:g}; <= {self.max_attempts_per_round} attempts/round; "
                f"evaluation {self.evaluation}; <= {self.max_local_epochs} local epochs; local DP "
                f"ε<={self.max_local_epsilon:g} at δ<={self.max_local_delta:g}"
                + (f"; user-level ε<={self.max_user_epsilon:g}" if self.max_user_epsilon else ""))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training(policy: SitePolicy, start: pb.RoundStart, *, num_examples: int = 0) -> None:
    """The round's training and local-DP parameters against this site's limits (raises
    :class:`PolicyViolation` naming the ``RoundStart`` field at fault).

    In every DP mode: ``training.local_epochs`` at most ``max_local_epochs`` (0 means the task's
    own default). Under local DP: ``dp.local.delta`` at most ``max_local_delta`` and below
    1/``num_examples`` (the site's records, when known: a δ of 1/n allows releasing a record in the
    clear); a ``dp.local.target_epsilon`` at most ``max_local_epsilon``; a fixed
    ``dp.local.noise_multiplier`` at least ``min_local_noise_multiplier``; a ``dp.local.accountant``
    among ``local_accountants`` ("" is an older server's: RDP). Pure: the caller turns a
    violation into a decline before anything about the site's data is used or leaves.
    """
    epochs = int(start.training.local_epochs)
    if epochs > policy.max_local_epochs:
        raise PolicyViolation("training.local_epochs", f"the round asks for {epochs} local epochs; this site "
                              f"trains at most {policy.max_local_epochs} (max_local_epochs)")
    if (start.dp.mode or "none") != "local":
        return
    local = start.dp.local
    delta = float(local.delta)
    if not (math.isfinite(delta) and 0 <= delta < 1):
        raise PolicyViolation("dp.local.delta", f"δ = {delta!r} is not a probability in [0, 1)")
    if delta > policy.max_local_delta:
        raise PolicyViolation("dp.local.delta", f"the job's δ = {delta:g} is above this site's "
                              f"max_local_delta = {policy.max_local_delta:g}: an ε at that δ is not the "
                              "site's guarantee")
    if num_examples > 0 and delta * num_examples >= 1:
        raise PolicyViolation("dp.local.delta", f"the job's δ = {delta:g} is at least 1/{num_examples} (this "
                              "site's records): such a δ allows releasing a record in the clear")
    target = float(local.target_epsilon)
    if not math.isfinite(target) or target > policy.max_local_epsilon:
        raise PolicyViolation("dp.local.target_epsilon", f"the job's target ε = {target:g} is above this site's "
                              f"max_local_epsilon = {policy.max_local_epsilon:g}")
    noise = float(local.noise_multiplier)
    if target <= 0 and not noise >= policy.min_local_noise_multiplier:
        raise PolicyViolation("dp.local.noise_multiplier", f"the job's DP-SGD noise multiplier {noise:g} is below "
                              f"this site's min_local_noise_multiplier = {policy.min_local_noise_multiplier:g}")
    accountant = local_accountant(local)
    if accountant not in policy.local_accountants:
        known = "" if accountant in ACCOUNTANTS else f" (fedveil knows {', '.join(ACCOUNTANTS)})"
        raise PolicyViolation("dp.local.accountant", f"the job accounts DP-SGD with {accountant[:32]!r}{known}; this "
                              f"site allows {', '.join(sorted(policy.local_accountants))} (local_accountants)")


def local_accountant(local: pb.LocalDpParams) -> str:
    """The accountant a round's DP-SGD is accounted with: the job's, or RDP from a server that names none."""
    return local.accountant or "rdp"


def check_job(policy: SitePolicy, job: pb.JobInfo) -> None:
    """At Join: refuse a job this site could never take part in (raises :class:`PolicyViolation`)."""
    if not policy.trust_server and not job.active_adversary:
        raise PolicyViolation("job.active_adversary", "the job runs passive secure aggregation; this site does not "
                              "trust the server (opt in with --trust-server / trust_server=True)")
    if job.dp_mode and job.dp_mode not in policy.allowed_dp_modes:
        raise PolicyViolation("job.dp_mode", f"the job uses DP mode {job.dp_mode!r}; this site allows "
                              f"{', '.join(sorted(policy.allowed_dp_modes))}")
    if policy.max_user_epsilon and (job.dp_mode in ("none", "local")
                                    or (job.dp_mode == "central" and not policy.trust_server)):
        # every release of such a job has no user-level noise the site can rely on (admission declines each)
        raise PolicyViolation("job.dp_mode", f"the job uses DP mode {job.dp_mode!r}, whose releases carry no "
                              "user-level noise this site can rely on; its policy caps user-level ε "
                              f"(max_user_epsilon={policy.max_user_epsilon:g})")
    if not policy.trust_server and policy.consortium and job.consortium and job.consortium != policy.consortium:
        raise PolicyViolation("job.consortium", f"the job runs in consortium {job.consortium!r}; this site's "
                              f"authority is for {policy.consortium!r}")


def build_policy(settings: Mapping[str, Any] | None = None, *, authority: tuple[str, bytes] | None = None,
                 revocations: RevocationList | None = None, roster: SignedRoster | None = None,
                 **overrides: Any) -> SitePolicy:
    """A policy from a settings table (e.g. :meth:`SitePolicy.from_toml`), flags that override it
    (``None`` values are ignored), and the authority the site pinned (consortium, public key)."""
    merged: dict[str, Any] = dict(settings or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    extra: dict[str, Any] = {}
    if authority is not None:
        extra.update(consortium=authority[0], authority_public_key=authority[1])
    if revocations is not None:
        extra["revocations"] = revocations
    if roster is not None:
        extra["roster"] = roster
    known = {f.name for f in dataclasses.fields(SitePolicy) if f.init}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise PolicyError(unknown[0], f"unknown policy setting (known: {', '.join(sorted(known))})")
    if "allowed_dp_modes" in merged:
        modes = merged["allowed_dp_modes"]
        if isinstance(modes, str) or not isinstance(modes, Iterable):
            raise PolicyError("allowed_dp_modes", f"must be a list of DP modes (got {modes!r})")
        merged["allowed_dp_modes"] = frozenset(str(m) for m in modes)
    return SitePolicy(**{**merged, **extra})
