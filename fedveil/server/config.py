"""The configuration of a federated training job (what ``fedveil server`` flags set).

:class:`ServerConfig` is validated on construction (:class:`ServerConfigError` names the flag at
fault). :meth:`ServerConfig.resume_key` is the part that must not change when a killed server is
restarted on the same store: the job's identity. Timeouts and other operational settings may
change between restarts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedveil.errors import FedveilError

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


@dataclass(frozen=True)
class ServerConfig:
    """A federated training job.

    Cohorts: each round samples ``clients_per_round`` (K) of the connected clients; a round starts
    once K are connected, or ``min_clients`` (M) have been connected for ``cohort_wait`` seconds.
    Secure aggregation (:meth:`secagg_plan`, :func:`fedveil.secagg.threshold.plan_threshold`):
    the server may control up to ``max_corrupt_fraction`` f of a cohort, so c = ⌊f·n⌋ colluders
    can hold a client's shares on the complete graph (a high-probability bound on a Harary
    graph, whose degree is derived from the cohort size unless ``secagg_degree`` is set). The
    threshold t defaults to the smallest t with 2t > h + c (h holders of each client's shares)
    in both modes — secure by default, since a passive-mode job shares its clients with the
    same server. An explicit ``threshold`` must satisfy 2t > h + c with ``active_adversary``
    and only t > c without; for a cohort smaller than ``clients_per_round`` it is capped at h.
    A round with fewer than t survivors aborts and is retried with a fresh cohort, at most
    ``max_round_attempts`` times.

    Deadlines: training plus key advertisement must finish within ``round_timeout`` seconds of
    the round start, every later secure-aggregation stage within ``stage_timeout``.

    User-level ε under central DP (``fedveil.dp.sampling.user_level_event``): by default
    (``dp_sampling_amplification=False``) every round is accounted as the plain Gaussian (q = 1).
    Amplification by sampling assumes that whether a site could be drawn is random and that nobody who
    sees the results knows who was drawn; neither holds by default here: sites are online when their
    operators keep them online, the server's operator (and the store, the dashboard, every cohort
    member, who learns its peers in secure aggregation) sees the participant lists, and the cohort draw
    is seeded by the job seed. ``dp_sampling_amplification=True`` claims it anyway for the K of N sites
    connected at the draw (sampling without replacement, so the ε then holds under the replace-one
    relation and needs the RDP accountant); whoever sets it must keep the participant lists and the
    draw's randomness out of every adversary's sight.
    """

    task: str
    rounds: int
    clients_per_round: int
    min_clients: int
    round_timeout: float = 300.0
    stage_timeout: float = 60.0
    cohort_wait: float = 10.0
    secagg: str = "complete"
    secagg_degree: int = 0
    threshold: int = 0
    expected_dropout: float = 0.1
    max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION
    ring_bits: int = 32
    clip_range: float = 1.0
    weighted: bool = True
    max_weight: float = 1000.0
    dp: str = "none"
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_adaptive_clipping: bool = False
    dp_target_quantile: float = 0.5
    dp_clip_learning_rate: float = 0.2
    dp_delta: float = 1e-5
    dp_epsilon_budget: float | None = None
    dp_accountant: str = "rdp"
    dp_sampling_amplification: bool = False
    dp_bits: int = 20
    dp_mechanism: str = "skellam"
    dp_local_noise_multiplier: float = 1.0
    dp_local_max_grad_norm: float = 1.0
    dp_local_target_epsilon: float = 0.0
    dp_client_epsilon_budget: float | None = None
    optimizer: str = "fedavg"
    server_lr: float = 1.0
    local_epochs: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0
    evaluate: bool = True
    final_evaluation: bool = True
    seed: int | None = None
    active_adversary: bool = True
    evaluation: str = "secure"
    consortium: str = ""
    authority_public_key: str = ""
    insecure_deterministic: bool = False
    max_round_attempts: int = 5
    max_evaluations_per_job: int = 1
    linger: float = 5.0
    poll_wait: float = 10.0
    model: str = ""
    """The job's model file (``--model``, from ``fedveil.save_initial_model``) instead of ``task``: the
    server then imports no user code (loop jobs); ``task`` is "" then."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ServerConfigError(_flag(name), f"{message} (got {getattr(self, name)!r})")

        need(bool(self.task) or bool(self.model), "task", "must name a task (module:attr), or give --model")
        need(not (self.task and self.model), "model", f"give --model or --task, not both (--task {self.task!r})")
        need(self.rounds >= 1, "rounds", "must be at least 1")
        need(isinstance(self.max_evaluations_per_job, int) and 0 <= self.max_evaluations_per_job <= 1000,
             "max_evaluations_per_job", "must be an integer in 0..1000 (sites answer at most their own cap)")
        need(self.clients_per_round >= 2, "clients_per_round", "must be at least 2 (secure aggregation needs 2)")
        need(2 <= self.min_clients <= self.clients_per_round, "min_clients",
             f"must be between 2 and --clients-per-round ({self.clients_per_round})")
        for name in ("round_timeout", "stage_timeout"):  # sent as uint32 milliseconds: at most 49 days
            need(math.isfinite(getattr(self, name)) and 0 < getattr(self, name) <= MAX_TIMEOUT_S, name,
                 f"must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} (7 days)")
        for name in ("cohort_wait", "linger", "poll_wait"):
            need(math.isfinite(getattr(self, name)) and 0 <= getattr(self, name) <= MAX_TIMEOUT_S, name,
                 f"must be between 0 and {MAX_TIMEOUT_S:.0f} seconds")
        need(self.secagg in GRAPHS, "secagg", f"must be one of {', '.join(GRAPHS)}")
        need(self.secagg_degree >= 0 and self.secagg_degree % 2 == 0, "secagg_degree", "must be even and >= 0")
        need(self.threshold == 0 or 2 <= self.threshold <= self.clients_per_round, "threshold",
             "must be 0 (derive) or between 2 and --clients-per-round")
        need(0 <= self.expected_dropout < 1, "expected_dropout", "must be in [0, 1)")
        need(0 <= self.max_corrupt_fraction < 0.5, "max_corrupt_fraction",
             "must be in [0, 0.5) (with half of the clients colluding no threshold is safe)")
        need(8 <= self.ring_bits <= 64, "ring_bits", "must be between 8 and 64")
        need(math.isfinite(self.clip_range) and self.clip_range > 0, "clip_range", "must be a positive number")
        need(math.isfinite(self.max_weight) and self.max_weight > 0, "max_weight", "must be a positive number")
        need(self.dp in DP_MODES, "dp", f"must be one of {', '.join(DP_MODES)}")
        need(math.isfinite(self.dp_clip) and self.dp_clip > 0, "dp_clip", "must be a positive number")
        need(math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0, "dp_noise_multiplier",
             "must be a number >= 0")
        need(0 <= self.dp_target_quantile <= 1, "dp_target_quantile", "must be in [0, 1]")
        need(self.dp_clip_learning_rate > 0, "dp_clip_learning_rate", "must be positive")
        need(0 < self.dp_delta < 1, "dp_delta", "must be in (0, 1)")
        for name in ("dp_epsilon_budget", "dp_client_epsilon_budget"):
            value = getattr(self, name)
            need(value is None or (math.isfinite(value) and value > 0), name, "must be a positive number")
        need(self.dp_accountant in ACCOUNTANTS, "dp_accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
        need(2 <= self.dp_bits <= DISTRIBUTED_MAX_BITS, "dp_bits", f"must be between 2 and {DISTRIBUTED_MAX_BITS}")
        need(self.dp_mechanism in DISTRIBUTED_MECHANISMS, "dp_mechanism",
             f"must be one of {', '.join(DISTRIBUTED_MECHANISMS)}")
        need(math.isfinite(self.dp_local_noise_multiplier) and self.dp_local_noise_multiplier >= 0,
             "dp_local_noise_multiplier", "must be a finite number >= 0")
        need(math.isfinite(self.dp_local_max_grad_norm) and self.dp_local_max_grad_norm > 0,
             "dp_local_max_grad_norm", "must be a finite positive number")
        need(math.isfinite(self.dp_local_target_epsilon) and self.dp_local_target_epsilon >= 0,
             "dp_local_target_epsilon", "must be a finite number >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(math.isfinite(self.server_lr) and self.server_lr > 0, "server_lr", "must be a positive number")
        need(0 <= self.local_epochs <= 10_000, "local_epochs", "must be between 0 (the task's default) and 10000")
        need(math.isfinite(self.learning_rate) and self.learning_rate >= 0, "learning_rate",
             "must be a finite number >= 0 (0 = the task's default)")
        need(0 <= self.batch_size <= 2**31 - 1, "batch_size", "must be between 0 (the task's default) and 2^31 - 1")
        need(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2^63)")
        need(self.max_round_attempts >= 1, "max_round_attempts", "must be at least 1")
        need(self.evaluation in EVALUATION_MODES, "evaluation", f"must be one of {', '.join(EVALUATION_MODES)}")
        need(len(self.consortium) <= 128 and self.consortium.isprintable(), "consortium",
             "must be a printable name of at most 128 characters")
        need(self.authority_public_key == "" or (len(self.authority_public_key) == 64 and all(
            c in "0123456789abcdef" for c in self.authority_public_key)), "authority_public_key",
             "must be the authority's Ed25519 public key as 64 lower-case hex digits")
        from fedveil.secagg.errors import ConfigError

        try:  # an explicit threshold, or a degree whose colluders could surround a client
            self.secagg_plan(self.clients_per_round, cap=False)
        except ConfigError as err:
            field, _, detail = str(err).partition(": ")
            raise ServerConfigError({"degree": "--secagg-degree"}.get(field, _flag(field)), detail) from None
        from fedveil.server.mechanisms import mechanism_class

        refusal = mechanism_class(self.dp).refusal(self)
        if refusal is not None:
            raise ServerConfigError(*refusal)

    def secagg_plan(self, cohort: int, *, cap: bool = True) -> ThresholdPlan:
        """Masking graph and threshold for a cohort of ``cohort`` clients (see the class docstring).

        An explicit ``threshold`` above the cohort's h holders is capped at h (``cap``) — still
        safe, as c < h — and otherwise validated (:class:`fedveil.secagg.ConfigError`).
        """
        from fedveil.secagg.threshold import plan_threshold

        plan = plan_threshold(cohort, self.secagg, degree=self.secagg_degree if self.secagg == "harary" else 0,
                              expected_dropout=self.expected_dropout, max_corrupt_fraction=self.max_corrupt_fraction)
        if not self.threshold:
            return plan
        t = min(self.threshold, plan.holders) if cap else self.threshold
        return plan.with_threshold(t, active=self.active_adversary)

    @property
    def authority_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.authority_public_key) if self.authority_public_key else None

    @property
    def user_level_dp(self) -> bool:
        from fedveil.server.mechanisms import mechanism_class

        return mechanism_class(self.dp).user_level

    @property
    def uses_weights(self) -> bool:
        """Weighted means leak nothing extra but break the user-level sensitivity bound: off with DP."""
        return self.weighted and not self.user_level_dp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """The settings that identify the job: a restart must repeat them."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Flags whose value differs from a stored job's ``resume_key`` (one line each)."""
        mine = self.resume_key()
        # A setting the stored run predates was, for it, the setting's default.
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        out = []
        for key in sorted(set(mine) | set(stored)):
            if key in OPERATIONAL_FIELDS:
                continue
            theirs = stored.get(key, defaults.get(key))
            if mine.get(key) != theirs:
                out.append(f"{_flag(key)}: the run was started with {theirs!r}, now {mine.get(key)!r}")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
