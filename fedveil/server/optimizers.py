"""Server optimizers: how the global model moves given the clients' aggregated update.

Clients send updates Δ_i = w_i − w (their locally trained weights minus the global weights they
started from); secure aggregation releases only the (weighted) mean Δ̄. Following Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021), the server treats Δ̄ as a pseudo-gradient (the
negative of a gradient) and applies a server optimizer to it:

- :class:`FedAvg` — x ← x + η Δ̄. With server learning rate η = 1 this is McMahan et al.'s
  FedAvg (the new global model is the weighted mean of the client models).
- :class:`FedAdam` — Algorithm 2 of Reddi et al.:
  m ← β₁ m + (1 − β₁) Δ̄,  v ← β₂ v + (1 − β₂) Δ̄²,  x ← x + η m / (√v + τ).
  Like the paper, no bias correction; τ controls the adaptivity.
- :class:`FedYogi` and :class:`FedAdagrad` — the paper's other two, differing only in v.

Optimizers work on flat float vectors (numpy) and on state dicts (``{name: tensor}``) alike; a
state dict is flattened in its own key order and rebuilt with the same keys, shapes and dtypes.
Their state round-trips through :meth:`ServerOptimizer.state_dict` (plain lists and floats,
JSON-serializable) so a resumed server continues exactly where it stopped.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

from fedveil.errors import FedveilError

StateDict = Mapping[str, torch.Tensor]


class OptimizerConfigError(FedveilError, ValueError):
    """A server optimizer hyper-parameter is out of range; the message names it."""


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ wᵢ Δᵢ / Σ wᵢ in float64 (the quantity FedAvg applies; the secure sum yields the same)."""
    if len(updates) == 0:
        raise ValueError("weighted_mean needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero (got {list(weights)})")
    total = np.zeros(np.asarray(updates[0]).shape, dtype=np.float64)
    for update, weight in zip(updates, w, strict=True):
        total += weight * np.asarray(update, dtype=np.float64)
    return total / w.sum()


def flatten_state(state: StateDict) -> np.ndarray:
    """Concatenate the floating-point entries of a state dict into one float64 vector."""
    parts = [t.detach().reshape(-1).to(torch.float64).cpu().numpy() for t in state.values() if t.is_floating_point()]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_state(vector: np.ndarray, like: StateDict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state`, with ``like``'s keys, shapes and dtypes."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, tensor in like.items():
        if tensor.is_floating_point():
            n = tensor.numel()
            out[key] = torch.from_numpy(np.array(vector[offset : offset + n])).reshape(tensor.shape).to(tensor.dtype)
            offset += n
        else:
            out[key] = tensor.clone()
    if offset != vector.shape[0]:
        raise ValueError(f"vector has {vector.shape[0]} entries, the state dict has {offset} floating-point entries")
    return out


def _check(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    bad = (
        not math.isfinite(value)
        or (value <= low if low_open else value < low)
        or (value >= high if high_open else value > high)
    )
    if bad:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise OptimizerConfigError(f"{name} must be in {lo}{low}, {high}{hi} (got {value})")


class ServerOptimizer(ABC):
    """Apply an aggregated pseudo-gradient Δ̄ (mean client update) to the global model."""

    name: str = "abstract"

    @overload
    def step(self, params: np.ndarray, mean_update: np.ndarray) -> np.ndarray: ...

    @overload
    def step(self, params: StateDict, mean_update: StateDict) -> dict[str, torch.Tensor]: ...

    def step(self, params: Any, mean_update: Any) -> Any:
        """Return the new global parameters (the inputs are not modified)."""
        if isinstance(params, Mapping):
            if not isinstance(mean_update, Mapping):
                raise TypeError("params is a state dict, so mean_update must be one too")
            if list(params.keys()) != list(mean_update.keys()):
                raise ValueError("params and mean_update have different keys")
            new = self._step(flatten_state(params), flatten_state(mean_update))
            return unflatten_state(new, params)
        x = np.asarray(params)
        delta = np.asarray(mean_update)
        if x.shape != delta.shape or x.ndim != 1:
            raise ValueError(
                f"params has shape {x.shape} and mean_update {delta.shape}; both must be the same 1-D shape"
            )
        if not np.all(np.isfinite(delta)):
            raise ValueError("mean_update contains a non-finite value")
        return self._step(x.astype(np.float64), delta.astype(np.float64)).astype(x.dtype, copy=False)

    @abstractmethod
    def _step(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (hyper-parameters and moments) for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


@dataclass
class FedAvg(ServerOptimizer):
    """x ← x + η Δ̄ (McMahan et al. 2017 with a server learning rate η; η = 1 is plain FedAvg)."""

    lr: float = 1.0
    name = "fedavg"

    def __post_init__(self) -> None:
        _check("server learning rate (lr)", self.lr, 0.0, 1e6, low_open=True)

    def _step(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return x + self.lr * delta

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _expect_name(state, self.name)
        self.lr = float(state["lr"])


@dataclass
class _Adaptive(ServerOptimizer):
    """Shared machinery of FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, Algorithm 2)."""

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check("server learning rate (lr)", self.lr, 0.0, 1e6, low_open=True)
        _check("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check("tau", self.tau, 0.0, 1e6, low_open=True)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.steps = 0

    def _initial_v(self, d: int) -> np.ndarray:
        # Reddi et al. initialise v₀ ≥ τ²; with v₀ = τ² the first step is at most η/(2τ)·|Δ|.
        return np.full(d, self.tau**2)

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray: ...

    def _step(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        if self.m is None or self.v is None:
            self.m = np.zeros_like(x)
            self.v = self._initial_v(x.shape[0])
        if self.m.shape != x.shape:
            raise ValueError(f"model has {x.shape[0]} parameters but the optimizer state has {self.m.shape[0]}")
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta)
        self.steps += 1
        return x + self.lr * self.m / (np.sqrt(self.v) + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "steps": self.steps,
            "m": None if self.m is None else self.m.tolist(),
            "v": None if self.v is None else self.v.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _expect_name(state, self.name)
        self.lr, self.beta1 = float(state["lr"]), float(state["beta1"])
        self.beta2, self.tau = float(state["beta2"]), float(state["tau"])
        self.steps = int(state["steps"])
        self.m = None if state["m"] is None else np.asarray(state["m"], dtype=np.float64)
        self.v = None if state["v"] is None else np.asarray(state["v"], dtype=np.float64)


class FedAdam(_Adaptive):
    """v ← β₂ v + (1 − β₂) Δ̄² (Reddi et al. 2021)."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta**2


class FedYogi(_Adaptive):
    """v ← v − (1 − β₂) Δ̄² sign(v − Δ̄²) (Reddi et al. 2021, after Zaheer et al. 2018)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d2 = delta**2
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


class FedAdagrad(_Adaptive):
    """v ← v + Δ̄² (Reddi et al. 2021)."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def make_optimizer(name: str, lr: float | None = None, **kwargs: float) -> ServerOptimizer:
    """Build a server optimizer by name (``fedavg``, ``fedadam``, ``fedyogi``, ``fedadagrad``)."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise OptimizerConfigError(f"unknown server optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})") from None
    if lr is not None:
        kwargs["lr"] = lr
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise OptimizerConfigError(f"bad option for {name}: {err}") from None


def optimizer_from_state(state: Mapping[str, Any]) -> ServerOptimizer:
    """Rebuild an optimizer, moments included, from :meth:`ServerOptimizer.state_dict` output."""
    opt = make_optimizer(str(state.get("name", "")))
    opt.load_state_dict(state)
    return opt


def _expect_name(state: Mapping[str, Any], name: str) -> None:
    if state.get("name") != name:
        raise ValueError(f"optimizer state is for {state.get('name')!r}, not {name!r}")
