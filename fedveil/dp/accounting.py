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
curves) are refused with :class:`UnsupportedEventError`. Pure module: no I/O, and no global state
but memos of pure results (the PLD accountant's one-step distributions and its ε per history).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedveil.dp.events import (  # noqa: F401 (re-exported: fedveil.dp.accounting is the accounting API)
    ACCOUNTANTS,
    ADD_REMOVE,
    DEFAULT_ORDERS,
    DP_EVENT_TYPES,
    RELATION_TEXT,
    REPLACE_ONE,
    AccountantName,
    AccountingLimitError,
    DpEvent,
    RdpCurveEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    _as_float,
    _as_int,
    _check_count,
    _check_noise,
    _check_sample_rate,
    _check_steps,
    check_delta,
    event_from_dict,
)
from fedveil.dp.rdp import (  # noqa: F401
    _describe,
    check_relations,
    composed_relation,
    rdp_to_epsilon,
    sampled_without_replacement_gaussian_rdp,
    subsampled_gaussian_rdp,
)

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
            raise AccountingLimitError(
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
        events = self._gaussian_history()
        if any(e.noise_multiplier == 0.0 for e in events):
            return math.inf
        points = max(self.base_grid_points(e.noise_multiplier) for e in events)
        if points > self.max_grid_points:
            z = min(e.noise_multiplier for e in events)
            raise AccountingLimitError(
                f"the PLD accountant would need a grid of {points:.3g} points for noise multiplier {z:g} "
                f"(limit {self.max_grid_points:.3g}); ε at so little noise is very large anyway: use 'rdp'"
            )
        composed = self.composed_grid_points(events)
        if composed > self.max_composed_grid_points:
            steps = sum(e.steps for e in events)
            raise AccountingLimitError(
                f"the PLD accountant would need a grid of {composed:.3g} points to compose {steps} steps "
                f"(limit {self.max_composed_grid_points:.3g}; the memory grows with it): use 'rdp'"
            )
        history = tuple((e.sample_rate, e.noise_multiplier, e.steps) for e in events)
        return _pld_epsilon(history, float(delta), self.value_discretization_interval)

    #: Above this many grid points for one step's privacy loss distribution, time and memory explode
    #: (about 10 s and 1 GB at 2e6 points; the count grows as 1 / z^2 for small z).
    max_grid_points: float = 5e6

    #: Above this many grid points for the composed distribution, memory runs to gigabytes (about 4.5 GB
    #: for 1e5 steps at z = 1, which this estimate puts at 7e7 points; a million steps ran out of 24 GB).
    max_composed_grid_points: float = 1e7

    def composed_grid_points(self, events: Sequence[SubsampledGaussianEvent]) -> float:
        """Grid points of the composition: the composed privacy loss spreads as the square root of the
        summed per-step variances (a step's loss has standard deviation about q·sqrt(exp(1/z²) − 1)),
        over the same ±8.3 standard deviations, plus one step's width."""
        variance = sum(e.steps * (e.sample_rate * math.sqrt(math.expm1(min(1.0 / e.noise_multiplier**2, 700.0))))**2
                       for e in events)
        widest = max(self.base_grid_points(e.noise_multiplier) for e in events)
        return widest + 2 * 8.3 * math.sqrt(variance) / self.value_discretization_interval

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


@functools.lru_cache(maxsize=32)
def _one_step_pld(sample_rate: float, noise_multiplier: float, interval: float) -> Any:
    """One Poisson-subsampled Gaussian step's PLD (pessimistic, add/remove one), as dp-accounting's
    ``PLDAccountant`` builds it: the costly part of an ε (about 0.1 s at z = 4), built once per
    (q, z). The objects are immutable (``compose`` and ``self_compose`` return new ones)."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval, sampling_prob=sample_rate)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, interval: float) -> float:
    """ε of a history of (q, z, steps) events at ``delta``, composed in order from the identity exactly as
    dp-accounting's ``PLDAccountant`` does (so the same number), memoized: a site's budget checks, its
    report and the server's ledger ask for the same history's ε several times a round."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sample_rate, noise_multiplier, steps in history:
        pld = pld.compose(_one_step_pld(sample_rate, noise_multiplier, interval).self_compose(steps))
    return float(pld.get_epsilon_for_delta(delta))


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
