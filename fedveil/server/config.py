"""The configuration of a federated training job (what ``fedveil server`` flags set), in parts.

:class:`ServerConfig` is composed of :class:`ScheduleConfig`, :class:`SecAggConfig`,
:class:`PrivacyConfig`, :class:`TrainingConfig` and :class:`EvaluationConfig` (where the sites
connect and how — address, TLS, tokens — is the transport's: :class:`fedveil.server.job_runner.GrpcEndpoint`).
Every part is validated on construction (:class:`ServerConfigError` names the flag at
fault). :meth:`ServerConfig.resume_key` is the part that must not change when a killed server is
restarted on the same store: the job's identity. Timeouts and other operational settings may
change between restarts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedveil.errors import FedveilError
from fedveil.settings_table import field_defaults

if TYPE_CHECKING:
    from fedveil.secagg.threshold import ThresholdPlan

GRAPHS = ("complete", "harary")
DP_MODES = ("none", "local", "central", "distributed")
OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedadagrad")
ACCOUNTANTS = ("rdp", "prv", "pld")
EVALUATION_MODES = ("secure", "clear", "off")
DISTRIBUTED_MECHANISMS = ("skellam", "ddg")
#: fedveil.dp.distributed.MAX_BITS (kept here so the config needs no numeric imports; a test pins them equal).
DISTRIBUTED_MAX_BITS = 48
#: fedveil.secagg.threshold.DEFAULT_MAX_CORRUPT_FRACTION (likewise; a test pins them equal).
DEFAULT_MAX_CORRUPT_FRACTION = 1.0 / 3.0

# Flags that may differ between the first start and a restart of the same job.
OPERATIONAL_FIELDS = frozenset(
    {"round_timeout", "stage_timeout", "cohort_wait", "linger", "max_round_attempts", "poll_wait"}
)


class ServerConfigError(FedveilError, ValueError):
    """A job parameter is invalid. ``flag`` is the command-line flag at fault."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.detail = message


#: Timeouts travel as uint32 milliseconds; a week is far beyond any sensible round.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _need(ok: bool, flat_name: str, value: Any, message: str) -> None:
    if not ok:
        raise ServerConfigError(_flag(flat_name), f"{message} (got {value!r})")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class _Part:
    """A part of the job's configuration. ``FLAT`` maps its fields to their flat names: the names of
    the ``fedveil server`` flags (with ``_``), of the job file's keys and of the stored job record."""

    FLAT: ClassVar[dict[str, str]] = {}

    def check(self, name: str, ok: bool, message: str) -> None:
        _need(ok, self.FLAT.get(name, name), getattr(self, name), message)

    def flat(self) -> dict[str, Any]:
        return {self.FLAT.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class ScheduleConfig(_Part):
    """Rounds, cohorts and deadlines. A round samples ``clients_per_round`` (K) of the connected
    sites; it starts once K are connected, or ``min_clients`` (M) have been for ``cohort_wait``
    seconds, or at once when M are and every other enrolled site is left out of the round
    (convicted, barred, out of its budget, its credential expired or revoked). Training plus key
    advertisement must finish within ``round_timeout`` of the round start, every later
    secure-aggregation stage within ``stage_timeout``; a round with fewer than t survivors aborts
    and is retried with a fresh cohort, at most ``max_round_attempts`` times."""

    rounds: int
    clients_per_round: int
    min_clients: int
    round_timeout: float = 300.0
    stage_timeout: float = 60.0
    cohort_wait: float = 10.0
    linger: float = 5.0
    poll_wait: float = 10.0
    max_round_attempts: int = 5

    def __post_init__(self) -> None:
        self.check("rounds", self.rounds >= 1, "must be at least 1")
        self.check("clients_per_round", self.clients_per_round >= 2, "must be at least 2 (secure aggregation needs 2)")
        self.check("min_clients", 2 <= self.min_clients <= self.clients_per_round,
                   f"must be between 2 and --clients-per-round ({self.clients_per_round})")
        for name in ("round_timeout", "stage_timeout"):  # sent as uint32 milliseconds: at most 49 days
            value = getattr(self, name)
            self.check(name, _finite(value) and 0 < value <= MAX_TIMEOUT_S,
                       f"must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} (7 days)")
        for name in ("cohort_wait", "linger", "poll_wait"):
            value = getattr(self, name)
            self.check(name, _finite(value) and 0 <= value <= MAX_TIMEOUT_S,
                       f"must be between 0 and {MAX_TIMEOUT_S:.0f} seconds")
        self.check("max_round_attempts", self.max_round_attempts >= 1, "must be at least 1")


@dataclass(frozen=True)
class SecAggConfig(_Part):
    """Secure aggregation (:meth:`ServerConfig.secagg_plan`, :func:`fedveil.secagg.threshold.plan_threshold`):
    the server may control up to ``max_corrupt_fraction`` f of a cohort, so c = ⌊f·n⌋ colluders can
    hold a site's shares on the complete graph (a high-probability bound on a Harary graph, whose
    degree is derived from the cohort size unless ``degree`` is set). The threshold t defaults to the
    smallest t with 2t > h + c (h holders of each site's shares) in both modes. An explicit
    ``threshold`` must satisfy 2t > h + c with ``active_adversary`` and only t > c without; for a
    cohort smaller than K it is capped at h. Also the ring: its bits, the fixed-point clip range, and
    whether (and how far) sites' updates are weighted."""

    FLAT: ClassVar[dict[str, str]] = {"graph": "secagg", "degree": "secagg_degree"}

    graph: str = "complete"
    degree: int = 0
    threshold: int = 0
    expected_dropout: float = 0.1
    max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION
    ring_bits: int = 32
    clip_range: float = 1.0
    weighted: bool = True
    max_weight: float = 1000.0
    active_adversary: bool = True
    consortium: str = ""
    authority_public_key: str = ""

    def __post_init__(self) -> None:
        self.check("graph", self.graph in GRAPHS, f"must be one of {', '.join(GRAPHS)}")
        self.check("degree", self.degree >= 0 and self.degree % 2 == 0, "must be even and >= 0")
        self.check("expected_dropout", 0 <= self.expected_dropout < 1, "must be in [0, 1)")
        self.check("max_corrupt_fraction", 0 <= self.max_corrupt_fraction < 0.5,
                   "must be in [0, 0.5) (with half of the clients colluding no threshold is safe)")
        self.check("ring_bits", 8 <= self.ring_bits <= 64, "must be between 8 and 64")
        self.check("clip_range", _finite(self.clip_range) and self.clip_range > 0, "must be a positive number")
        self.check("max_weight", _finite(self.max_weight) and self.max_weight > 0, "must be a positive number")
        self.check("consortium", len(self.consortium) <= 128 and self.consortium.isprintable(),
                   "must be a printable name of at most 128 characters")
        key = self.authority_public_key
        self.check("authority_public_key", key == "" or (len(key) == 64 and all(c in "0123456789abcdef" for c in key)),
                   "must be the authority's Ed25519 public key as 64 lower-case hex digits")

    @property
    def authority_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.authority_public_key) if self.authority_public_key else None

    def check_serving(self) -> None:
        """What a server running this job needs beyond a valid config: in active-adversary mode, the
        consortium authority's key. Without it the server could not tell a credential the sites
        will refuse, and would draw such a site into every cohort (each attempt aborted, the job
        failed). A config may be built before its authority is known (a simulation fills in the
        in-memory authority it makes), so this is checked when a server takes the job, not here."""
        if self.active_adversary and not self.authority_public_key:
            raise ServerConfigError("--authority", "active-adversary mode (the secure default) needs the consortium "
                                    "authority's public key (authority_public_key): give --authority FILE "
                                    "(fedveil authority init), or --passive for a job whose sites trust the server")


@dataclass(frozen=True)
class PrivacyConfig(_Part):
    """The privacy mechanism (:mod:`fedveil.server.mechanisms`: ``mode`` none, local, central or
    distributed) and its parameters, the accountant and the budgets.

    User-level ε under central DP (``fedveil.dp.sampling.user_level_event``): by default
    (``sampling_amplification=False``) every round is accounted as the plain Gaussian (q = 1).
    Amplification by sampling assumes that whether a site could be drawn is random and that nobody
    who sees the results knows who was drawn; neither holds by default here: sites are online when
    their operators keep them online, the server's operator (and the store, the dashboard, every
    cohort member) sees the participant lists, and the cohort draw is seeded by the job seed.
    ``sampling_amplification=True`` claims it anyway for the K of N sites connected at the draw
    (sampling without replacement, so the ε then holds under the replace-one relation and needs the
    RDP accountant); whoever sets it must keep the participant lists and the draw's randomness out of
    every adversary's sight.
    """

    FLAT: ClassVar[dict[str, str]] = {
        "mode": "dp", "clip": "dp_clip", "noise_multiplier": "dp_noise_multiplier",
        "adaptive_clipping": "dp_adaptive_clipping", "target_quantile": "dp_target_quantile",
        "clip_learning_rate": "dp_clip_learning_rate", "delta": "dp_delta", "epsilon_budget": "dp_epsilon_budget",
        "accountant": "dp_accountant", "sampling_amplification": "dp_sampling_amplification", "bits": "dp_bits",
        "mechanism": "dp_mechanism", "local_noise_multiplier": "dp_local_noise_multiplier",
        "local_max_grad_norm": "dp_local_max_grad_norm", "local_target_epsilon": "dp_local_target_epsilon",
        "client_epsilon_budget": "dp_client_epsilon_budget",
    }

    mode: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    sampling_amplification: bool = False
    bits: int = 20
    mechanism: str = "skellam"
    local_noise_multiplier: float = 1.0
    local_max_grad_norm: float = 1.0
    local_target_epsilon: float = 0.0
    client_epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        self.check("mode", self.mode in DP_MODES, f"must be one of {', '.join(DP_MODES)}")
        self.check("clip", _finite(self.clip) and self.clip > 0, "must be a positive number")
        self.check("noise_multiplier", _finite(self.noise_multiplier) and self.noise_multiplier >= 0,
                   "must be a number >= 0")
        self.check("target_quantile", 0 <= self.target_quantile <= 1, "must be in [0, 1]")
        self.check("clip_learning_rate", self.clip_learning_rate > 0, "must be positive")
        self.check("delta", 0 < self.delta < 1, "must be in (0, 1)")
        for name in ("epsilon_budget", "client_epsilon_budget"):
            value = getattr(self, name)
            self.check(name, value is None or (_finite(value) and value > 0), "must be a positive number")
        # a budget with nothing to cap would let an operator believe ε is capped (review of 2026-12-07)
        self.check("epsilon_budget", self.epsilon_budget is None or self.mode in ("central", "distributed"),
                   "caps the user-level ε, which only --dp central or distributed has")
        self.check("client_epsilon_budget", self.client_epsilon_budget is None or self.mode == "local",
                   "caps the sites' DP-SGD ε, which only --dp local has")
        self.check("accountant", self.accountant in ACCOUNTANTS, f"must be one of {', '.join(ACCOUNTANTS)}")
        self.check("bits", 2 <= self.bits <= DISTRIBUTED_MAX_BITS, f"must be between 2 and {DISTRIBUTED_MAX_BITS}")
        self.check("mechanism", self.mechanism in DISTRIBUTED_MECHANISMS,
                   f"must be one of {', '.join(DISTRIBUTED_MECHANISMS)}")
        self.check("local_noise_multiplier", _finite(self.local_noise_multiplier) and self.local_noise_multiplier >= 0,
                   "must be a finite number >= 0")
        self.check("local_max_grad_norm", _finite(self.local_max_grad_norm) and self.local_max_grad_norm > 0,
                   "must be a finite positive number")
        self.check("local_target_epsilon", _finite(self.local_target_epsilon) and self.local_target_epsilon >= 0,
                   "must be a finite number >= 0")


@dataclass(frozen=True)
class TrainingConfig(_Part):
    """The server optimizer (FedAvg or an adaptive one, Reddi et al. 2021) and the sites' local
    training settings it announces (0: the task's default)."""

    optimizer: str = "fedavg"
    server_lr: float = 1.0
    local_epochs: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0

    def __post_init__(self) -> None:
        self.check("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}")
        self.check("server_lr", _finite(self.server_lr) and self.server_lr > 0, "must be a positive number")
        self.check("local_epochs", 0 <= self.local_epochs <= 10_000,
                   "must be between 0 (the task's default) and 10000")
        self.check("learning_rate", _finite(self.learning_rate) and self.learning_rate >= 0,
                   "must be a finite number >= 0 (0 = the task's default)")
        self.check("batch_size", 0 <= self.batch_size <= 2**31 - 1,
                   "must be between 0 (the task's default) and 2^31 - 1")


@dataclass(frozen=True)
class EvaluationConfig(_Part):
    """Federated evaluation: after each round (``each_round``) and at the end (``final``), as secure
    sums (``mode`` "secure"), per site in the clear ("clear", only where sites opt in too) or not at
    all; sites answer at most ``max_per_job`` evaluation requests of a job.

    Under local DP evaluation is off unless ``under_local_dp``: DP-SGD's ε covers training only, so a
    site with the default policy declines to evaluate (``SitePolicy.evaluate_under_local_dp``), and
    asking would cost an evaluation-only round that every such site declines."""

    FLAT: ClassVar[dict[str, str]] = {"each_round": "evaluate", "final": "final_evaluation", "mode": "evaluation",
                                      "max_per_job": "max_evaluations_per_job",
                                      "under_local_dp": "evaluate_under_local_dp"}

    each_round: bool = True
    final: bool = True
    mode: str = "secure"
    max_per_job: int = 1
    under_local_dp: bool = False

    def __post_init__(self) -> None:
        self.check("mode", self.mode in EVALUATION_MODES, f"must be one of {', '.join(EVALUATION_MODES)}")
        self.check("max_per_job", isinstance(self.max_per_job, int) and 0 <= self.max_per_job <= 1000,
                   "must be an integer in 0..1000 (sites answer at most their own cap)")


_PARTS: dict[str, type[_Part]] = {"schedule": ScheduleConfig, "secagg": SecAggConfig, "privacy": PrivacyConfig,
                                  "training": TrainingConfig, "evaluation": EvaluationConfig}
_JOB_FIELDS = ("task", "model", "seed", "insecure_deterministic")
#: flat name → (part, field): how the flags, the job file and the stored record name each setting.
FLAT_NAMES: dict[str, tuple[str | None, str]] = {
    **{name: (None, name) for name in _JOB_FIELDS},
    **{part.FLAT.get(f.name, f.name): (key, f.name) for key, part in _PARTS.items()
       for f in dataclasses.fields(part)},  # type: ignore[arg-type]
}


def flat_types() -> dict[str, Any]:
    """The type of each flat setting (for the settings table's file checks)."""
    import typing

    hints = {key: typing.get_type_hints(part) for key, part in _PARTS.items()}
    top = {"task": str, "model": str, "seed": int | None, "insecure_deterministic": bool}
    return {flat: top[attr] if part is None else hints[part][attr] for flat, (part, attr) in FLAT_NAMES.items()}


def flat_defaults() -> dict[str, Any]:
    """The default of each flat setting, from the parts' dataclasses (None where the job must give it:
    the task and the cohort sizes); the ``fedveil server`` flags take theirs from here."""
    parts = {key: field_defaults(part) for key, part in _PARTS.items()}
    top = field_defaults(ServerConfig)
    return {flat: top[attr] if part is None else parts[part][attr] for flat, (part, attr) in FLAT_NAMES.items()}


@dataclass(frozen=True)
class ServerConfig:
    """A federated training job, made of its parts: the schedule, secure aggregation, the privacy
    mechanism, the training and the evaluation settings (each validated on its own; the checks that
    span parts are here).

    ``task`` names the task module (turnkey CSV sites, simulations); ``model`` is the job's model
    file (``--model``, from ``fedveil.save_initial_model``) instead, so the server imports no user
    code. ``seed`` fixes the data order and the initial model; ``insecure_deterministic`` (tests
    only) derives keys, masks and noise from it too.

    The flat form (:meth:`from_flat`, :meth:`to_dict`) names every setting as its ``fedveil server``
    flag does (``dp_clip``, ``secagg_degree``): the job file, the command line and the stored job
    record use it, so stores written before the parts existed resume unchanged.
    """

    task: str
    schedule: ScheduleConfig
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    model: str = ""
    seed: int | None = None
    insecure_deterministic: bool = False

    def __post_init__(self) -> None:
        _need(bool(self.task) or bool(self.model), "task", self.task, "must name a task (module:attr), or give --model")
        _need(not (self.task and self.model), "model", self.model,
              f"give --model or --task, not both (--task {self.task!r})")
        _need(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2^63)")
        _need(self.secagg.threshold == 0 or 2 <= self.secagg.threshold <= self.schedule.clients_per_round,
              "threshold", self.secagg.threshold, "must be 0 (derive) or between 2 and --clients-per-round")
        from fedveil.secagg.errors import ConfigError

        try:  # an explicit threshold, or a degree whose colluders could surround a client
            self.secagg_plan(self.schedule.clients_per_round, cap=False)
        except ConfigError as err:
            name, _, detail = str(err).partition(": ")
            raise ServerConfigError({"degree": "--secagg-degree"}.get(name, _flag(name)), detail) from None
        from fedveil.server.mechanisms import mechanism_class

        refusal = mechanism_class(self.privacy.mode).refusal(self)
        if refusal is not None:
            raise ServerConfigError(*refusal)

    # -- the flat form ------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, task: str = "", **flat: Any) -> ServerConfig:
        """A config from flat settings (``rounds=3, dp="central", dp_clip=1.0``); unknown names are refused."""
        parts: dict[str, dict[str, Any]] = {key: {} for key in _PARTS}
        top: dict[str, Any] = {}
        for name, value in flat.items():
            where = FLAT_NAMES.get(name)
            if where is None:
                raise ServerConfigError(_flag(name), "unknown setting")
            part, attr = where
            (top if part is None else parts[part])[attr] = value
        try:
            built = {key: _PARTS[key](**values) for key, values in parts.items()}
        except TypeError as err:  # a required schedule setting missing
            missing = str(err).rpartition(": ")[2].strip("'")
            raise ServerConfigError(_flag(missing.split("'")[0]), "required") from None
        return cls(task=task, **top, **built)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The flat settings (see the class docstring)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _JOB_FIELDS}
        for key in _PARTS:
            out.update(getattr(self, key).flat())
        return out

    def replace(self, **flat: Any) -> ServerConfig:
        """A copy with some flat settings changed (validated again)."""
        return ServerConfig.from_flat(**{**self.to_dict(), **flat})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerConfig:
        """From a stored flat record; settings this version no longer has are ignored."""
        return cls.from_flat(**{k: v for k, v in data.items() if k in FLAT_NAMES})

    def resume_key(self) -> dict[str, Any]:
        """The settings that identify the job: a restart must repeat them."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Flags whose value differs from a stored job's ``resume_key`` (one line each)."""
        mine = self.resume_key()
        # A setting the stored run predates was, for it, the setting's default.
        defaults = ServerConfig.from_flat(task="x", rounds=1, clients_per_round=2, min_clients=2).to_dict()
        out = []
        for key in sorted(set(mine) | set(stored)):
            if key in OPERATIONAL_FIELDS:
                continue
            theirs = stored.get(key, defaults.get(key))
            if mine.get(key) != theirs:
                out.append(f"{_flag(key)}: the run was started with {theirs!r}, now {mine.get(key)!r}")
        return out

    def check_serving(self) -> None:
        """The checks a server makes before it runs this job (:meth:`SecAggConfig.check_serving`)."""
        self.secagg.check_serving()

    # -- derived --------------------------------------------------------------------------------
    def secagg_plan(self, cohort: int, *, cap: bool = True) -> ThresholdPlan:
        """Masking graph and threshold for a cohort of ``cohort`` sites (see :class:`SecAggConfig`).

        An explicit ``threshold`` above the cohort's h holders is capped at h (``cap``) — still
        safe, as c < h — and otherwise validated (:class:`fedveil.secagg.ConfigError`).
        """
        from fedveil.secagg.threshold import plan_threshold

        s = self.secagg
        plan = plan_threshold(cohort, s.graph, degree=s.degree if s.graph == "harary" else 0,
                              expected_dropout=s.expected_dropout, max_corrupt_fraction=s.max_corrupt_fraction)
        if not s.threshold:
            return plan
        t = min(s.threshold, plan.holders) if cap else s.threshold
        return plan.with_threshold(t, active=s.active_adversary)

    @property
    def user_level_dp(self) -> bool:
        from fedveil.server.mechanisms import mechanism_class

        return mechanism_class(self.privacy.mode).user_level

    @property
    def uses_weights(self) -> bool:
        """Weighted means leak nothing extra but break the user-level sensitivity bound: off with DP."""
        return self.secagg.weighted and not self.user_level_dp

