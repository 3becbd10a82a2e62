"""The job's model by name: :class:`ModelSpec` (parameter names, shapes, dtypes) and by-name transfer.

The server announces the job's spec at Join (``JobInfo.model``); a site checks its own model against
it before it trains (:meth:`ModelSpec.check`), and every transfer between a model and the flat vector
on the wire goes by name (:meth:`ModelSpec.vector`, :meth:`ModelSpec.load`), never by position: a
site whose layers are registered in another order still gets each global tensor in the right place,
and a site whose model differs is refused at once with the first differing parameter and both shapes.

Only floating-point state is federated (parameters and float buffers such as BatchNorm's running
statistics); integer buffers (``num_batches_tracked``) stay local. Opacus's ``_module.`` wrapper
prefix (a ``GradSampleModule``) is not part of a name, so a model made private with the site's own
``PrivacyEngine`` matches the spec of the plain one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedveil.errors import FedveilError

WRAPPER_PREFIX = "_module."


class ModelMismatchError(FedveilError, ValueError):
    """A model does not fit the job's model; the message names the first differing parameter."""

    field = "model"


@dataclass(frozen=True)
class TensorInfo:
    """One federated tensor: its state-dict name, shape and dtype (``"float32"``; ``""`` = unstated)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = ""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def describe(self) -> str:
        return f"shape {tuple(self.shape)}" + (f" {self.dtype}" if self.dtype else "")


def plain_name(key: str) -> str:
    """A state-dict key without Opacus's ``_module.`` wrapper prefixes."""
    while key.startswith(WRAPPER_PREFIX):
        key = key[len(WRAPPER_PREFIX):]
    return key


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def canonical_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each floating-point key's plain name → the plain name of the first key sharing its storage.

    Some modules expose one tensor under two names (Opacus's ``DPLSTM`` keeps ``weight_ih_l0`` as an
    alias of ``l0.ih.weight``); the federation carries it once, under its first name.
    """
    seen: dict[tuple[object, ...], str] = {}
    out: dict[str, str] = {}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        name = plain_name(key)
        ident = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype) if value.numel() else None
        if ident is not None and ident in seen:
            out[name] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = name
        out[name] = name
    return out


def federated_state(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's floating-point state by plain name, in ``state_dict()`` order, each tensor once."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    canonical = canonical_names(state)
    return {plain_name(k): v for k, v in state.items()
            if v.is_floating_point() and canonical[plain_name(k)] == plain_name(k)}


@dataclass(frozen=True)
class ModelSpec:
    """The federated tensors of a model, in the order of the flat vector on the wire."""

    tensors: tuple[TensorInfo, ...]

    @classmethod
    def of(cls, model: nn.Module | Mapping[str, torch.Tensor]) -> ModelSpec:
        """The spec of a model (or a state dict): its floating-point entries in ``state_dict()`` order."""
        return cls(tuple(TensorInfo(name, tuple(int(d) for d in t.shape), dtype_name(t.dtype))
                         for name, t in federated_state(model).items()))

    @classmethod
    def from_proto(cls, specs: Sequence[object]) -> ModelSpec:
        """From ``JobInfo.model`` (``TensorSpec`` messages); duplicate or empty names are refused."""
        tensors = tuple(TensorInfo(str(s.name), tuple(int(d) for d in s.shape), str(s.dtype))  # type: ignore[attr-defined]
                        for s in specs)
        names = [t.name for t in tensors]
        if any(not n for n in names):
            raise ModelMismatchError("the job's model spec has a tensor without a name", field="job.model")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ModelMismatchError(f"the job's model spec names {dup!r} twice", field="job.model")
        return cls(tensors)

    def to_proto(self) -> list[object]:
        from fedveil.protocol import fedveil_pb2 as pb

        return [pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in self.tensors]

    @property
    def size(self) -> int:
        """Values in the flat vector."""
        return sum(t.numel for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def difference(self, other: ModelSpec, *, mine: str = "the job's model", theirs: str = "this site's model") -> str:
        """The first difference between two specs, by name ("" when they match): a tensor of this
        spec missing from ``other`` or with another shape or dtype (in this spec's order), then a
        tensor ``other`` has that this spec does not."""
        their = {t.name: t for t in other.tensors}
        for t in self.tensors:
            o = their.get(t.name)
            if o is None:
                return f"{t.name}: {mine} has it ({t.describe()}), {theirs} has no such parameter"
            if o.shape != t.shape:
                return f"{t.name}: {mine} has shape {t.shape}, {theirs} has shape {o.shape}"
            if t.dtype and o.dtype and o.dtype != t.dtype:
                return f"{t.name}: {mine} has dtype {t.dtype}, {theirs} has dtype {o.dtype} (shape {t.shape})"
        names = set(self.names)
        for o in other.tensors:
            if o.name not in names:
                return f"{o.name}: {theirs} has it ({o.describe()}), {mine} has no such parameter"
        return ""

    def check(self, model: nn.Module | Mapping[str, torch.Tensor], *, what: str = "this site's model") -> None:
        """Raise :class:`ModelMismatchError` naming the first difference between ``model`` and this spec."""
        diff = self.difference(ModelSpec.of(model), theirs=what)
        if diff:
            raise ModelMismatchError(f"{what} does not fit the job's model: {diff}")

    def vector(self, model: nn.Module | Mapping[str, torch.Tensor]) -> np.ndarray:
        """The flat float32 vector of ``model``'s tensors, taken by name in this spec's order."""
        state = federated_state(model)
        parts = []
        for t in self.tensors:
            value = state.get(t.name)
            if value is None or tuple(value.shape) != t.shape:
                self.check(state)  # names the first difference
            assert value is not None
            parts.append(value.detach().reshape(-1).to(torch.float32).cpu().numpy())
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def trainable_mask(self, model: nn.Module) -> np.ndarray:
        """Which entries of the flat vector are ``model``'s trainable parameters (True), as opposed to
        float buffers (BatchNorm's running statistics) and frozen parameters."""
        trainable = {p.data_ptr() for p in model.parameters() if p.requires_grad}
        state = model.state_dict()
        canonical = canonical_names(state)
        names = {canonical[plain_name(k)] for k, v in state.items()
                 if v.is_floating_point() and v.numel() and v.data_ptr() in trainable}
        return np.concatenate([np.full(t.numel, t.name in names) for t in self.tensors]) if self.tensors \
            else np.zeros(0, dtype=bool)

    def load(self, vector: np.ndarray, model: nn.Module) -> nn.Module:
        """Load a flat vector in this spec's order into ``model`` by name, in place; returns ``model``."""
        flat = np.asarray(vector)
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ModelMismatchError(f"the vector has shape {flat.shape}, the job's model needs ({self.size},)")
        self.check(model)
        offsets: dict[str, tuple[int, TensorInfo]] = {}
        offset = 0
        for t in self.tensors:
            offsets[t.name] = (offset, t)
            offset += t.numel
        new_state: dict[str, torch.Tensor] = {}
        state = model.state_dict()
        canonical = canonical_names(state)
        for key, tensor in state.items():
            place = offsets.get(canonical[plain_name(key)]) if tensor.is_floating_point() else None
            if place is None:
                new_state[key] = tensor
                continue
            start, info = place
            chunk = torch.from_numpy(np.array(flat[start:start + info.numel], dtype=np.float32))
            new_state[key] = chunk.reshape(tensor.shape).to(dtype=tensor.dtype, device=tensor.device)
        model.load_state_dict(new_state)
        return model
