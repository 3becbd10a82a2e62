"""Privacy events: what a mechanism did, as plain frozen dataclasses a ledger can serialize,
and the neighbouring relations they are analysed under. The module docstring of
:mod:`fedveil.dp.accounting` explains each event and relation. Pure module: no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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


class AccountingLimitError(FedveilError, ValueError):
    """The accountant cannot give ε for these parameters within its limits: a PRV or PLD grid too large
    for so little noise, or a target ε no noise multiplier reaches. A site that meets it in a round's
    parameters declines the round (the parameters came from the server)."""


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


