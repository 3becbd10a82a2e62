"""Privacy accountants: RDP and PRV (Opacus analysis) and PLD (Google's ``dp-accounting``).

Why three: the RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism") is fast, composes any mechanism that supplies an RDP
curve, and is O(1) per composed event, but its RDP→(ε, δ) conversion is loose. The PRV accountant
(Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy") and the PLD accountant
(Koskela et al. 2020; Doroshenko et al. 2022, "Connect the Dots") compose the privacy-loss
distribution numerically and give ε within a stated error, typically 10–30 % tighter.

All accountants here share one small interface, :class:`PrivacyAccountant`, modelled on Opacus's
``IAccountant``: ``compose(event)`` / ``step(noise_multiplier=, sample_rate=)``,
``get_epsilon(delta)``, ``state_dict()`` / ``load_state_dict()``. Events are plain frozen
dataclasses so that ledgers can serialize them:

- :class:`SubsampledGaussianEvent` — the Poisson-subsampled Gaussian mechanism (sampling rate ``q``,
  noise multiplier ``z`` = noise std ÷ L2 sensitivity) composed ``steps`` times. This is one
  DP-SGD run (sample level: q = batch ÷ local dataset) or DP-FedAvg rounds (user level, one step
  per round: q = 1 for the plain Gaussian, or a Poisson rate for a coordinator that samples each site
  independently; see ``fedveil.dp.sampling``).
- :class:`SampledWithoutReplacementGaussianEvent` — a fixed-size cohort: ``sample_size`` (K) of
  ``population`` (N) drawn uniformly without replacement, then the Gaussian mechanism on the sum,
  composed ``steps`` times. This is what fedveil's coordinator really does each round.
- :class:`RdpCurveEvent` — any other mechanism given only by its RDP curve ε(α) on a grid of orders
  (e.g. the Skellam or distributed discrete Gaussian mechanism). Only the RDP accountant can compose
  it; PRV and PLD raise :class:`UnsupportedEventError` rather than silently substituting a Gaussian.

Neighbouring relations. Poisson sampling, plain Gaussian rounds and RDP-curve events are analysed
under add/remove one record (``"add_remove"``, Opacus's and dp-accounting's default): the output
hardly changes whether a record (at user level: a site) is in the data or not. Sampling without
replacement is only analysed under replace-one (``"replace_one"``, Balle, Barthe, Gaboardi 2018;
Wang, Balle, Kasiviswanathan 2019): N is public and the output hardly changes when one record's data
is replaced by anybody else's. Under replace-one the sum of updates clipped to norm S moves by up to
2S, not S, so the Gaussian's multiplier is z / 2 (see :class:`SampledWithoutReplacementGaussianEvent`).
An accountant composes its whole history under one relation (:attr:`PrivacyAccountant.relation`):
add/remove while every event allows it, replace-one as soon as one event needs it; plain Gaussian
rounds are then re-expressed at z / 2, and events that cannot be (Poisson-subsampled with q < 1, RDP
curves) are refused with :class:`UnsupportedEventError`. Pure module: no I/O, no global state.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Union

import numpy as np

from fedveil.errors import FedveilError

#: RDP orders used by default: Opacus's default grid extended with larger orders, which matter for
#: few compositions at small noise (large ε).
DEFAULT_ORDERS: Final[tuple[float, ...]] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [80.0, 128.0, 256.0, 512.0]
)

ACCOUNTANTS: Final[tuple[str, ...]] = ("rdp", "prv", "pld")
AccountantName = Literal["rdp", "prv", "pld"]

#: Neighbouring relations (dp-accounting's ``NeighboringRelation.ADD_OR_REMOVE_ONE`` / ``REPLACE_ONE``).
ADD_REMOVE: Final[str] = "add_remove"
REPLACE_ONE: Final[str] = "replace_one"
RELATION_TEXT: Final[dict[str, str]] = {
    ADD_REMOVE: "add/remove one",
    REPLACE_ONE: "replace one (the number of candidates is public)",
}


class UnsupportedEventError(FedveilError, ValueError):
    """The accountant cannot compose this event (e.g. an RDP-only mechanism given to PLD or PRV)."""


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


def _check_sample_rate(q: float, name: str = "sample_rate") -> None:
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not math.isfinite(q) or not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (got {q!r})")


def _check_noise(z: float, name: str = "noise_multiplier") -> None:
    if not isinstance(z, (int, float)) or isinstance(z, bool) or math.isnan(z) or z < 0.0 or math.isinf(z):
        raise ValueError(f"{name} must be a finite number >= 0 (got {z!r})")


def _check_count(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


def _check_steps(steps: int, name: str = "steps") -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {steps!r})")


def check_delta(delta: float, name: str = "delta") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 < delta < 1``."""
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not math.isfinite(delta):
        raise ValueError(f"{name} must be a number in (0, 1) (got {delta!r})")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (got {delta!r})")


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """Poisson-subsampled Gaussian mechanism with sampling rate ``sample_rate`` and noise multiplier
    ``noise_multiplier`` (std ÷ L2 sensitivity), self-composed ``steps`` times.

    ``sample_rate = 1`` is the plain Gaussian mechanism (full participation).
    """

    sample_rate: float
    noise_multiplier: float
    steps: int = 1

    kind: ClassVar[str] = "subsampled_gaussian"
    relation: ClassVar[str] = ADD_REMOVE

    def __post_init__(self) -> None:
        _check_sample_rate(self.sample_rate)
        _check_noise(self.noise_multiplier)
        _check_steps(self.steps)

    @property
    def mechanism(self) -> str:
        return "subsampled_gaussian"

    def with_steps(self, steps: int) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(self.sample_rate, self.noise_multiplier, steps)

    def same_mechanism(self, other: DpEvent) -> bool:
        return (
            isinstance(other, SubsampledGaussianEvent)
            and other.sample_rate == self.sample_rate
            and other.noise_multiplier == self.noise_multiplier
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class SampledWithoutReplacementGaussianEvent:
    """A fixed-size cohort: ``sample_size`` (K) of ``population`` (N) candidates drawn uniformly without
    replacement, then the Gaussian mechanism with noise std ``noise_multiplier · S`` on the sum of their
    contributions, each of L2 norm at most ``S``; self-composed ``steps`` times.

    Relation: replace-one only (dp-accounting refuses ``SampledWithoutReplacementDpEvent`` under any
    other). N is public, and neighbouring inputs replace one candidate's data by another's: the sum then
    moves by up to ‖Δ_a − Δ_b‖ ≤ 2S, so the Gaussian's multiplier under this relation is
    :attr:`replace_one_noise_multiplier` = z / 2 (dp-accounting's PLD accountant makes the same
    doubling itself for ``REPLACE_ONE``; its RDP accountant does not, and takes the multiplier over the
    replace-one sensitivity, so z / 2 is what must be handed to it). The RDP curve is Wang, Balle,
    Kasiviswanathan 2019 ("Subsampled Rényi DP and analytical moments accountant", Thm 27, with the
    Gaussian's own bound), as computed by ``dp_accounting.rdp``. K = N is the plain Gaussian at z / 2.
    """

    population: int
    sample_size: int
    noise_multiplier: float
    steps: int = 1

    kind: ClassVar[str] = "sampled_without_replacement_gaussian"
    relation: ClassVar[str] = REPLACE_ONE

    def __post_init__(self) -> None:
        _check_count(self.population, "population")
        _check_count(self.sample_size, "sample_size")
        if self.sample_size > self.population:
            raise ValueError(
                f"sample_size must be at most population {self.population} (got {self.sample_size!r})"
            )
        _check_noise(self.noise_multiplier)
        _check_steps(self.steps)

    @property
    def mechanism(self) -> str:
        return "sampled_without_replacement_gaussian"

    @property
    def sample_rate(self) -> float:
        """K / N, the fraction of candidates in the cohort (not a Poisson rate)."""
        return self.sample_size / self.population

    @property
    def replace_one_noise_multiplier(self) -> float:
        """Noise std over the replace-one sensitivity 2S: z / 2."""
        return self.noise_multiplier / 2.0

    def with_steps(self, steps: int) -> SampledWithoutReplacementGaussianEvent:
        return SampledWithoutReplacementGaussianEvent(self.population, self.sample_size, self.noise_multiplier, steps)

    def same_mechanism(self, other: DpEvent) -> bool:
        return (
            isinstance(other, SampledWithoutReplacementGaussianEvent)
            and other.population == self.population
            and other.sample_size == self.sample_size
            and other.noise_multiplier == self.noise_multiplier
        )

    def to_dp_accounting(self) -> Any:
        """The same event in dp-accounting's terms (compose it with ``NeighboringRelation.REPLACE_ONE``)."""
        import dp_accounting

        inner = dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, dp_accounting.GaussianDpEvent(self.replace_one_noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(inner, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "population": self.population,
            "sample_size": self.sample_size,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class RdpCurveEvent:
    """A mechanism known only through its Rényi-DP curve: ``rdp[i]`` = ε at order ``orders[i]`` for ONE
    application, self-composed ``steps`` times (RDP composes additively).

    Use :meth:`from_function` with the mechanism's own bound, e.g. the Skellam RDP of Agarwal, Kairouz,
    Liu 2021 or the distributed discrete Gaussian bound of Kairouz, Liu, Steinke 2021. ``params`` records
    the mechanism's parameters for the ledger (not used in the math).
    """

    mechanism: str
    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    steps: int = 1
    params: tuple[tuple[str, float | int | str], ...] = ()

    kind: ClassVar[str] = "rdp_curve"
    relation: ClassVar[str] = ADD_REMOVE

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError(f"mechanism must be a non-empty string (got {self.mechanism!r})")
        _check_steps(self.steps)
        if len(self.orders) == 0 or len(self.orders) != len(self.rdp):
            raise ValueError(
                f"orders and rdp must be non-empty and of equal length (got {len(self.orders)} and {len(self.rdp)})"
            )
        orders = np.asarray(self.orders, dtype=np.float64)
        rdp = np.asarray(self.rdp, dtype=np.float64)
        if np.any(~np.isfinite(orders)) or np.any(orders <= 1.0) or np.any(np.diff(orders) <= 0):
            raise ValueError("orders must be finite, > 1 and strictly increasing")
        if np.any(np.isnan(rdp)) or np.any(rdp < 0.0):
            raise ValueError(f"rdp values must be >= 0 (mechanism {self.mechanism!r})")

    @classmethod
    def from_function(
        cls,
        mechanism: str,
        rdp_fn: Callable[[np.ndarray], np.ndarray],
        *,
        orders: Sequence[float] = DEFAULT_ORDERS,
        steps: int = 1,
        params: Mapping[str, float | int | str] | None = None,
    ) -> RdpCurveEvent:
        """Evaluate ``rdp_fn(orders)`` (one application of the mechanism) and wrap it as an event."""
        grid = np.asarray(orders, dtype=np.float64)
        values = np.asarray(rdp_fn(grid), dtype=np.float64)
        if values.shape != grid.shape:
            raise ValueError(f"rdp_fn returned shape {values.shape}, expected {grid.shape} (one value per order)")
        return cls(
            mechanism=mechanism,
            orders=tuple(float(a) for a in grid),
            rdp=tuple(float(v) for v in values),
            steps=steps,
            params=tuple(sorted((params or {}).items())),
        )

    def with_steps(self, steps: int) -> RdpCurveEvent:
        return RdpCurveEvent(self.mechanism, self.orders, self.rdp, steps, self.params)

    def same_mechanism(self, other: DpEvent) -> bool:
        return (
            isinstance(other, RdpCurveEvent)
            and other.mechanism == self.mechanism
            and other.orders == self.orders
            and other.rdp == self.rdp
            and other.params == self.params
        )

    def rdp_at(self, orders: np.ndarray) -> np.ndarray:
        """RDP of ONE application at ``orders``. RDP is non-decreasing in α, so an order missing from the
        curve's grid takes the value at the next larger grid order (a sound upper bound); orders above the
        grid get +inf (never used as the optimum)."""
        grid = np.asarray(self.orders, dtype=np.float64)
        values = np.asarray(self.rdp, dtype=np.float64)
        idx = np.searchsorted(grid, orders, side="left")
        out = np.full(orders.shape, np.inf)
        ok = idx < grid.size
        out[ok] = values[idx[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mechanism": self.mechanism,
            "orders": list(self.orders),
            # JSON has no infinity: an order where the bound is infinite is written as null.
            "rdp": [v if math.isfinite(v) else None for v in self.rdp],
            "steps": self.steps,
            "params": dict(self.params),
        }


DpEvent = Union[SubsampledGaussianEvent, SampledWithoutReplacementGaussianEvent, RdpCurveEvent]
#: The event classes, for ``isinstance`` checks.
DP_EVENT_TYPES: Final[tuple[type, ...]] = (
    SubsampledGaussianEvent,
    SampledWithoutReplacementGaussianEvent,
    RdpCurveEvent,
)


def event_from_dict(data: Mapping[str, Any]) -> DpEvent:
    """Inverse of ``event.to_dict()``. Raises ``ValueError`` naming the bad field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"event must be an object (got {type(data).__name__})")
    kind = data.get("kind")
    try:
        if kind == "subsampled_gaussian":
            return SubsampledGaussianEvent(
                sample_rate=_as_float(data["sample_rate"], "sample_rate"),
                noise_multiplier=_as_float(data["noise_multiplier"], "noise_multiplier"),
                steps=_as_int(data["steps"], "steps"),
            )
        if kind == "sampled_without_replacement_gaussian":
            return SampledWithoutReplacementGaussianEvent(
                population=_as_int(data["population"], "population"),
                sample_size=_as_int(data["sample_size"], "sample_size"),
                noise_multiplier=_as_float(data["noise_multiplier"], "noise_multiplier"),
                steps=_as_int(data["steps"], "steps"),
            )
        if kind == "rdp_curve":
            params = data.get("params", {})
            if not isinstance(params, Mapping):
                raise ValueError("params must be an object")
            return RdpCurveEvent(
                mechanism=str(data["mechanism"]),
                orders=tuple(_as_float(a, "orders") for a in data["orders"]),
                rdp=tuple(math.inf if v is None else _as_float(v, "rdp") for v in data["rdp"]),
                steps=_as_int(data["steps"], "steps"),
                params=tuple(sorted(params.items())),
            )
    except KeyError as err:
        raise ValueError(f"event of kind {kind!r} lacks field {err.args[0]!r}") from None
    except TypeError as err:
        raise ValueError(f"event of kind {kind!r} has a field of the wrong type: {err}") from None
    raise ValueError(
        f"unknown event kind {kind!r} (expected 'subsampled_gaussian', 'sampled_without_replacement_gaussian' "
        "or 'rdp_curve')"
    )


def _as_float(value: Any, name: str) -> float:
    """A JSON number as a float; booleans and strings are refused (a ledger holds numbers, not text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number (got {value!r})")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer (got {value!r})")
    return value


# --------------------------------------------------------------------------------------------------
# RDP math (Opacus analysis) and conversion
# --------------------------------------------------------------------------------------------------


def subsampled_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian mechanism at ``orders`` (Mironov, Talwar, Zhang
    2019), computed by Opacus's ``accountants.analysis.rdp``."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    return np.asarray(
        opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
        dtype=np.float64,
    )


def sampled_without_replacement_gaussian_rdp(
    population: int, sample_size: int, noise_multiplier: float, orders: np.ndarray
) -> np.ndarray:
    """RDP (replace-one) of ONE :class:`SampledWithoutReplacementGaussianEvent` at ``orders``.

    dp-accounting's bound (Wang, Balle, Kasiviswanathan 2019, Thm 27; non-integer orders interpolated by
    their Cor. 10), the function its ``RdpAccountant`` applies to ``SampledWithoutReplacementDpEvent``,
    evaluated at the replace-one multiplier z / 2 (sensitivity 2S, see the event's docstring), and capped
    order by order at the plain Gaussian's α / (2 (z/2)^2). The cap is itself a bound for the sampled
    mechanism (couple both inputs on the same cohort: each pair of outputs is a Gaussian pair at most 2S
    apart or identical, and exp((α−1) D_α) is jointly convex), so the pointwise minimum is one too.
    dp-accounting's bound alone exceeds it at small orders, and at all orders up to 5-10 when K is close
    to N (e.g. 4 of 5): without the cap, "amplification" would cost more than taking everyone.
    """
    grid = np.asarray(orders, dtype=np.float64)
    z = noise_multiplier / 2.0
    if z == 0.0:
        return np.full(grid.shape, np.inf)
    from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp

    # A module-level function of dp-accounting (not exported): tests pin it to the public RdpAccountant.
    values = dpa_rdp._compute_rdp_sample_wor_gaussian(sample_size / population, z, [float(a) for a in grid])
    return np.minimum(np.asarray(values, dtype=np.float64), grid / (2.0 * z * z))


def composed_relation(events: Iterable[DpEvent]) -> str:
    """The relation ``events`` compose under: replace-one as soon as one event needs it, else add/remove."""
    return REPLACE_ONE if any(e.relation == REPLACE_ONE for e in events) else ADD_REMOVE


def _describe(event: DpEvent) -> str:
    if isinstance(event, SubsampledGaussianEvent):
        return f"a Poisson-subsampled Gaussian event (q = {event.sample_rate:g})"
    if isinstance(event, SampledWithoutReplacementGaussianEvent):
        return f"a without-replacement Gaussian event ({event.sample_size} of {event.population})"
    return f"the RDP-curve event {event.mechanism!r}"


def check_relations(history: Sequence[DpEvent], event: DpEvent) -> None:
    """Raise :class:`UnsupportedEventError` unless ``event`` and ``history`` compose under one relation.

    Under replace-one, a plain Gaussian round (q = 1, sensitivity S under add/remove) is the Gaussian
    with sensitivity 2S, i.e. multiplier z / 2; a Poisson-subsampled event with q < 1 and an RDP curve
    are bounds for add/remove only, and fedveil does not convert them.
    """
    events = [*history, event]
    if composed_relation(events) == ADD_REMOVE:
        return
    for e in events:
        if e.relation == REPLACE_ONE or (isinstance(e, SubsampledGaussianEvent) and e.sample_rate == 1.0):
            continue
        raise UnsupportedEventError(
            f"cannot compose {_describe(e)} with sampling without replacement: a fixed-size cohort is accounted "
            "under the replace-one relation, and this event is analysed only under add/remove (only plain "
            "Gaussian rounds, q = 1, are re-expressed under replace-one, at noise multiplier z / 2)"
        )


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """Convert an RDP curve to (ε, δ)-DP: ε = min_α rdp(α) + log1p(−1/α) − (log δ + log α)/(α − 1).

    This is the improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Rényi
    DP", Thm 21) = Canonne, Kamath, Steinke 2020 (Prop 12), the one used by both Opacus and dp-accounting.
    Returns ``(epsilon, optimal_order)``.
    """
    check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if np.all(r == 0.0):
        return 0.0, float(a[0])
    with np.errstate(over="ignore", invalid="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
        # KL bound: delta >= sqrt(1 - exp(-rdp(1))) ≥ ... gives ε = 0 (as dp-accounting does).
        kl_zero = delta**2 + np.expm1(-r) > 0.0
    eps = np.where(kl_zero, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


# --------------------------------------------------------------------------------------------------
# Accountants
# --------------------------------------------------------------------------------------------------


class PrivacyAccountant(abc.ABC):
    """Common interface (after Opacus's ``IAccountant``).

    ``history`` holds the composed events; consecutive events of the same mechanism are merged by adding
    their ``steps``, so composing N identical rounds one by one costs O(1) memory and work per round.
    """

    name: str = ""

    def __init__(self) -> None:
        self.history: list[DpEvent] = []

    # -- composition --------------------------------------------------------------------------------
    def compose(self, event: DpEvent) -> None:
        """Compose one event (itself possibly ``steps`` self-compositions)."""
        self._check_supported(event)
        if self.history and self.history[-1].same_mechanism(event):
            last = self.history.pop()
            self.history.append(last.with_steps(last.steps + event.steps))
        else:
            self.history.append(event)
        self._on_compose(event)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Opacus-style signal: ``steps`` steps of the Poisson-subsampled Gaussian mechanism."""
        self.compose(SubsampledGaussianEvent(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps))

    def supports(self, event: DpEvent) -> bool:
        try:
            self._check_supported(event)
        except UnsupportedEventError:
            return False
        return True

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.history)

    @property
    def relation(self) -> str:
        """The neighbouring relation of :meth:`get_epsilon`: ``"add_remove"`` or ``"replace_one"``."""
        return composed_relation(self.history)

    def __len__(self) -> int:
        return len(self.history)

    # -- queries ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (an upper bound: the guarantee, not an estimate)."""

    def epsilon_after(self, events: Sequence[DpEvent], delta: float) -> float:
        """ε if ``events`` were composed next (what-if; leaves this accountant unchanged)."""
        trial = self.copy()
        for e in events:
            trial.compose(e)
        return trial.get_epsilon(delta)

    def fresh(self) -> PrivacyAccountant:
        """An empty accountant of the same kind and settings (sharing caches where that is safe)."""
        return self._empty_like()

    def copy(self) -> PrivacyAccountant:
        other = self._empty_like()
        other.load_state_dict(self.state_dict())
        return other

    # -- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: ``{"mechanism": name, "history": [event dicts], ...}``."""
        return {"mechanism": self.name, "history": [e.to_dict() for e in self.history], **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "history" not in state or "mechanism" not in state:
            raise ValueError("accountant state must be an object with 'mechanism' and 'history'")
        if state["mechanism"] != self.name:
            raise ValueError(f"cannot load {state['mechanism']!r} accountant state into a {self.name!r} accountant")
        self._load_extra_state(state)
        self.history = []
        self._reset()
        for item in state["history"]:
            self.compose(event_from_dict(item))

    # -- hooks for subclasses -----------------------------------------------------------------------
    def _check_supported(self, event: DpEvent, history: Sequence[DpEvent] | None = None) -> None:
        """Raise :class:`UnsupportedEventError` unless ``event`` can follow ``history`` (default: ours)."""
        if not isinstance(event, DP_EVENT_TYPES):
            raise UnsupportedEventError(f"not a DP event: {type(event).__name__}")
        check_relations(self.history if history is None else history, event)

    def _on_compose(self, event: DpEvent) -> None:  # noqa: B027 - optional hook
        pass

    def _reset(self) -> None:  # noqa: B027 - optional hook
        pass

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    def _empty_like(self) -> PrivacyAccountant: ...


class RDPAccountant(PrivacyAccountant):
    """Rényi-DP accountant. Keeps the running RDP vector, so ``compose`` is O(#orders) and independent of
    ``steps`` (RDP is linear in the number of compositions) and ``get_epsilon`` is O(#orders).

    Composes Poisson-subsampled Gaussian events (curve from Opacus's analysis; cached per (q, z) in this
    instance), any :class:`RdpCurveEvent` (add/remove) and :class:`SampledWithoutReplacementGaussianEvent`
    (replace-one; curve from dp-accounting). When the first replace-one event arrives, the running RDP
    is recomputed under replace-one (:func:`check_relations` says which events allow it).
    """

    name = "rdp"

    def __init__(self, orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS) -> None:
        super().__init__()
        grid = np.asarray(orders, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or np.any(grid <= 1.0) or np.any(np.diff(grid) <= 0):
            raise ValueError("orders must be a non-empty, strictly increasing sequence of numbers > 1")
        self.orders = grid
        self._rdp = np.zeros_like(grid)
        self._rdp_relation = ADD_REMOVE  # the relation self._rdp is computed under
        self._curve_cache: dict[tuple[Any, ...], np.ndarray] = {}

    def _curve(self, event: DpEvent, relation: str) -> np.ndarray:
        """RDP of one application of ``event`` under ``relation`` (checked compatible beforehand)."""
        if isinstance(event, RdpCurveEvent):
            return event.rdp_at(self.orders)
        key: tuple[Any, ...]
        if isinstance(event, SampledWithoutReplacementGaussianEvent):
            key = ("wor", event.population, event.sample_size, event.noise_multiplier)
        elif relation == REPLACE_ONE:
            key = ("gaussian_replace_one", event.noise_multiplier)
        else:
            key = (event.sample_rate, event.noise_multiplier)
        curve = self._curve_cache.get(key)
        if curve is None:
            if isinstance(event, SampledWithoutReplacementGaussianEvent):
                curve = sampled_without_replacement_gaussian_rdp(
                    event.population, event.sample_size, event.noise_multiplier, self.orders
                )
            elif relation == REPLACE_ONE:  # a plain Gaussian round (q = 1): sensitivity 2S, multiplier z / 2
                curve = subsampled_gaussian_rdp(1.0, event.noise_multiplier / 2.0, self.orders)
            else:
                curve = subsampled_gaussian_rdp(event.sample_rate, event.noise_multiplier, self.orders)
            self._curve_cache[key] = curve
        return curve

    def _rdp_of(self, events: Sequence[DpEvent], relation: str) -> np.ndarray:
        total = np.zeros_like(self.orders)
        for e in events:
            total = total + e.steps * self._curve(e, relation)
        return total

    def _on_compose(self, event: DpEvent) -> None:
        relation = self.relation
        if relation != self._rdp_relation:  # the first replace-one event: recompute everything under it
            self._rdp = self._rdp_of(self.history, relation)
            self._rdp_relation = relation
        else:
            self._rdp = self._rdp + event.steps * self._curve(event, relation)

    def _reset(self) -> None:
        self._rdp = np.zeros_like(self.orders)
        self._rdp_relation = ADD_REMOVE

    @property
    def rdp(self) -> np.ndarray:
        """Current cumulative RDP at :attr:`orders` (a copy)."""
        return self._rdp.copy()

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """``(epsilon, optimal_order)``."""
        return rdp_to_epsilon(self.orders, self._rdp, delta)

    def get_epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta)[0]

    def epsilon_after(self, events: Sequence[DpEvent], delta: float) -> float:
        seen = list(self.history)
        for e in events:
            self._check_supported(e, seen)
            seen.append(e)
        relation = composed_relation(seen)
        if relation == self._rdp_relation:
            rdp = self._rdp + self._rdp_of(events, relation)
        else:
            rdp = self._rdp_of(seen, relation)
        return rdp_to_epsilon(self.orders, rdp, delta)[0]

    def _extra_state(self) -> dict[str, Any]:
        return {"orders": [float(a) for a in self.orders]}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "orders" in state:
            grid = np.asarray(state["orders"], dtype=np.float64)
            if grid.shape != self.orders.shape or not np.array_equal(grid, self.orders):
                self.orders = grid
                self._curve_cache = {}

    def _empty_like(self) -> RDPAccountant:
        other = RDPAccountant(self.orders)
        other._curve_cache = self._curve_cache  # curves depend only on the event and orders: safe to share
        return other


class _GaussianOnlyAccountant(PrivacyAccountant):
    """Base for accountants that represent the privacy loss distribution numerically and therefore only
    handle mechanisms whose distribution they know (here: the Poisson-subsampled Gaussian)."""

    #: Why this accountant cannot do sampling without replacement (for the error message).
    _without_replacement_gap: ClassVar[str] = ""

    def _check_supported(self, event: DpEvent, history: Sequence[DpEvent] | None = None) -> None:
        super()._check_supported(event, history)
        if isinstance(event, SampledWithoutReplacementGaussianEvent):
            raise UnsupportedEventError(
                f"the {self.name.upper()} accountant cannot account sampling without replacement (a fixed-size "
                f"cohort of {event.sample_size} of {event.population}): {self._without_replacement_gap}; use the "
                "'rdp' accountant, which composes it under the replace-one relation"
            )
        if not isinstance(event, SubsampledGaussianEvent):
            raise UnsupportedEventError(
                f"the {self.name.upper()} accountant only composes Poisson-subsampled Gaussian events; "
                f"mechanism {event.mechanism!r} is given only by its RDP curve — use the 'rdp' accountant "
                "(no Gaussian stand-in is substituted)"
            )

    def _gaussian_history(self) -> list[SubsampledGaussianEvent]:
        return [e for e in self.history if isinstance(e, SubsampledGaussianEvent)]


class PRVAccountant(_GaussianOnlyAccountant):
    """Privacy-loss-random-variable accountant (Gopi, Lee, Wutschitz 2021) via Opacus's implementation.

    ``get_epsilon`` returns Opacus's upper bound: the true ε lies within ``eps_error`` below it (with δ
    error ``delta_error``, default δ/1000).
    """

    name = "prv"
    _without_replacement_gap = "Opacus's PRV analysis knows only Poisson sampling (add/remove)"
    #: Refuse compositions whose discretization grid would exceed this many points (memory and minutes).
    max_domain_points: int = 20_000_000

    def domain_points(self, delta: float) -> float:
        """Size of the grid Opacus's PRV accountant would discretize on (Gopi et al. 2021, Remark 5.6):
        2L / mesh with mesh = eps_error / sqrt(T · log(12/δ_err) / 2)."""
        from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

        events = self._gaussian_history()
        delta_error = self.delta_error if self.delta_error is not None else delta / 1000
        prvs = [PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in events]
        steps = [e.steps for e in events]
        half_width = compute_safe_domain_size(prvs, steps, eps_error=self.eps_error, delta_error=delta_error)
        mesh = self.eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
        return 2.0 * float(half_width) / mesh

    def __init__(self, eps_error: float = 0.01, delta_error: float | None = None) -> None:
        super().__init__()
        if not eps_error > 0.0:
            raise ValueError(f"eps_error must be > 0 (got {eps_error!r})")
        self.eps_error = float(eps_error)
        self.delta_error = delta_error

    def get_epsilon(self, delta: float) -> float:
        check_delta(delta)
        events = self._gaussian_history()
        if not events:
            return 0.0
        if any(e.noise_multiplier == 0.0 for e in events):
            return math.inf
        from opacus.accountants import PRVAccountant as OpacusPRV

        acc = OpacusPRV()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
        points = self.domain_points(delta)
        if points > self.max_domain_points:
            raise ValueError(
                f"the PRV accountant would need a grid of {points:.3g} points for {self.total_steps} steps "
                f"(limit {self.max_domain_points:.3g}); use the 'pld' or 'rdp' accountant or a larger eps_error"
            )
        with np.errstate(divide="ignore"):  # log(1 - q) = -inf at q = 1 is handled by Opacus's np.where
            eps = float(acc.get_epsilon(delta, eps_error=self.eps_error, delta_error=self.delta_error))
        return max(eps, 0.0)  # Opacus's upper bound can dip below 0 when δ is large; ε is never negative

    def _extra_state(self) -> dict[str, Any]:
        return {"eps_error": self.eps_error, "delta_error": self.delta_error}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "eps_error" in state:
            self.eps_error = float(state["eps_error"])
        if "delta_error" in state:
            de = state["delta_error"]
            self.delta_error = None if de is None else float(de)

    def _empty_like(self) -> PRVAccountant:
        return PRVAccountant(self.eps_error, self.delta_error)


class PLDAccountant(_GaussianOnlyAccountant):
    """Privacy-loss-distribution accountant via Google's ``dp_accounting.pld.PLDAccountant``.

    The PLD is discretized pessimistically (``value_discretization_interval``, default 1e-4), so the
    returned ε is an upper bound; composing T steps adds at most about T × interval of slack.
    """

    name = "pld"
    _without_replacement_gap = "dp-accounting's PLD accountant has no SampledWithoutReplacementDpEvent"

    def __init__(self, value_discretization_interval: float = 1e-4) -> None:
        super().__init__()
        if not value_discretization_interval > 0.0:
            raise ValueError(f"value_discretization_interval must be > 0 (got {value_discretization_interval!r})")
        self.value_discretization_interval = float(value_discretization_interval)

    def to_dp_event(self) -> Any:
        """The history as a ``dp_accounting`` ``ComposedDpEvent`` (for cross-checks and interop)."""
        import dp_accounting

        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(
                        e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                    ),
                    e.steps,
                )
                for e in self._gaussian_history()
            ]
        )

    def get_epsilon(self, delta: float) -> float:
        check_delta(delta)
        if not self.history:
            return 0.0
        from dp_accounting.pld import PLDAccountant as GooglePLD

        events = self._gaussian_history()
        if any(e.noise_multiplier == 0.0 for e in events):
            return math.inf
        points = max(self.base_grid_points(e.noise_multiplier) for e in events)
        if points > self.max_grid_points:
            z = min(e.noise_multiplier for e in events)
            raise ValueError(
                f"the PLD accountant would need a grid of {points:.3g} points for noise multiplier {z:g} "
                f"(limit {self.max_grid_points:.3g}); ε at so little noise is very large anyway: use 'rdp'"
            )
        acc = GooglePLD(value_discretization_interval=self.value_discretization_interval)
        acc.compose(self.to_dp_event())
        return float(acc.get_epsilon(delta))

    #: Above this many grid points for one step's privacy loss distribution, time and memory explode
    #: (about 10 s and 1 GB at 2e6 points; the count grows as 1 / z^2 for small z).
    max_grid_points: float = 5e6

    def base_grid_points(self, noise_multiplier: float) -> float:
        """Grid points dp_accounting needs for one Gaussian step: its privacy loss spans about
        2 t / z + 1 / (2 z^2) (tails truncated at t ~ 8.3 standard deviations), at this interval."""
        z = noise_multiplier
        return (2 * 8.3 / z + 1 / (2 * z * z)) / self.value_discretization_interval

    def _extra_state(self) -> dict[str, Any]:
        return {"value_discretization_interval": self.value_discretization_interval}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "value_discretization_interval" in state:
            self.value_discretization_interval = float(state["value_discretization_interval"])

    def _empty_like(self) -> PLDAccountant:
        return PLDAccountant(self.value_discretization_interval)


def make_accountant(name: str) -> PrivacyAccountant:
    """Accountant by name: ``"rdp"``, ``"prv"`` or ``"pld"``."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    if name == "pld":
        return PLDAccountant()
    raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {name!r})")


def accountant_from_state_dict(state: Mapping[str, Any]) -> PrivacyAccountant:
    """Rebuild an accountant (of the right kind) from :meth:`PrivacyAccountant.state_dict`."""
    if not isinstance(state, Mapping):
        raise ValueError("accountant state must be an object")
    acc = make_accountant(str(state.get("mechanism")))
    acc.load_state_dict(state)
    return acc


# --------------------------------------------------------------------------------------------------
# One-shot helpers and the noise solver
# --------------------------------------------------------------------------------------------------


def compute_epsilon(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    check_delta(delta)
    acc = make_accountant(accountant)
    acc.compose(SubsampledGaussianEvent(sample_rate, noise_multiplier, steps))
    return acc.get_epsilon(delta)


@dataclass(frozen=True)
class NoiseSolution:
    """Result of :func:`solve_noise_multiplier`: ``epsilon`` ≤ ``target_epsilon`` and within the tolerance."""

    noise_multiplier: float
    epsilon: float
    target_epsilon: float
    evaluations: int


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rel_tolerance: float = 0.005,
    max_noise_multiplier: float = 1e4,
) -> NoiseSolution:
    """Smallest-found noise multiplier z with target·(1 − rel_tolerance) ≤ ε(z) ≤ target.

    ε is decreasing in z, so a doubling bracket followed by bisection finds it; the returned z always
    meets the target (conservative side). Raises ``ValueError`` if the target is unreachable (e.g. the
    PRV accountant's ε has an ``eps_error`` floor).
    """
    if not isinstance(target_epsilon, (int, float)) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0 (got {target_epsilon!r})")
    check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
    if not 0.0 < rel_tolerance < 1.0:
        raise ValueError(f"rel_tolerance must be in (0, 1) (got {rel_tolerance!r})")

    evaluations = 0

    def eps_of(z: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return compute_epsilon(
            sample_rate=sample_rate, noise_multiplier=z, steps=steps, delta=delta, accountant=accountant
        )

    lo = 0.0  # ε(0) = ∞ > target
    hi = 1.0
    eps_hi = eps_of(hi)
    while eps_hi > target_epsilon:
        lo = hi
        hi *= 2.0
        if hi > max_noise_multiplier:
            raise ValueError(
                f"target_epsilon {target_epsilon} is unreachable with the {accountant} accountant: even "
                f"noise_multiplier={lo:g} gives epsilon={eps_hi:.6g}"
            )
        eps_hi = eps_of(hi)
    floor = target_epsilon * (1.0 - rel_tolerance)
    for _ in range(200):
        if eps_hi >= floor or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        eps_mid = eps_of(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return NoiseSolution(
        noise_multiplier=hi, epsilon=eps_hi, target_epsilon=float(target_epsilon), evaluations=evaluations
    )
