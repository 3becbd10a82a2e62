"""The job's model file: names, shapes, dtypes and initial values, so the server never imports user code.

A loop job is set up from the user's own module, once, where the model class lives::

    model = Net()                                                    # the user's own class
    fedveil.save_initial_model(model, "init.safetensors", dp="local")  # DP-SGD-compatible copy saved

and the server starts from the file (``fedveil server --model init.safetensors``): it aggregates and
checkpoints by the names in the file and sends them at Join, where each site checks its own model
against them (:mod:`fedveil.model_spec`). The file is a plain `safetensors` file (no pickle, so
loading it runs no code); its metadata keeps the federated order (``fedveil.order``) and the DP mode
it was made for (``fedveil.dp``). ``--task`` stays for turnkey CSV clients and simulations.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from fedveil.errors import FedveilError
from fedveil.model_spec import ModelSpec, federated_state
from fedveil.task import ColumnSpec, DataSchema, Task

FORMAT = "fedveil-model/1"
DP_MODES = ("none", "local", "central", "distributed")


class ModelFileError(FedveilError, ValueError):
    """A model file cannot be written or read; the message names the file and what is wrong."""

    field = "--model"


def save_initial_model(model: nn.Module, path: str | Path, *, dp: str | bool = "none") -> nn.Module:
    """Write the job's model file (``fedveil server --model PATH``) from the user's own module.

    Args:
        model: the model as the sites build it (its current values become the initial global model).
        path: where to write the ``.safetensors`` file.
        dp: the job's DP mode (``"none"``, ``"local"``, ``"central"``, ``"distributed"``; ``True`` means
            ``"local"``). Under local DP the model is first made DP-SGD-compatible
            (:func:`fedveil.dp.compat.make_dp_compatible`: BatchNorm → GroupNorm, LSTM → DPLSTM), so the
            sites, which must build theirs the same way, can train it with DP-SGD.

    Returns:
        The module whose state was saved (the DP-compatible copy under local DP, else ``model``).

    Raises:
        ModelFileError: ``dp`` is not a DP mode, the model has no floating-point state or non-finite
            values, or the file cannot be written.
    """
    from safetensors.torch import save_file

    mode = "local" if dp is True else ("none" if dp is False else dp)
    if mode not in DP_MODES:
        raise ModelFileError(f"dp: expected one of {', '.join(DP_MODES)} (got {dp!r})", field="dp")
    if mode == "local":
        from fedveil.dp.compat import make_dp_compatible

        model = make_dp_compatible(model)
    state = federated_state(model)
    if not state:
        raise ModelFileError("model: it has no floating-point parameters or buffers to federate", field="model")
    for name, value in state.items():
        if not bool(torch.isfinite(value).all()):
            raise ModelFileError(f"model: {name} holds NaN or infinite values", field="model")
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}
    metadata = {"format": FORMAT, "fedveil.order": json.dumps(list(tensors)), "fedveil.dp": mode}
    if Path(path).is_dir():
        raise ModelFileError(f"{str(path)!r} is a directory; give the file to write", field="path")
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as err:
        raise ModelFileError(f"{str(path)!r}: cannot write it ({err.strerror})", field="path") from None
    except SafetensorError as err:  # safetensors wraps the OS's refusal
        raise ModelFileError(f"{str(path)!r}: cannot write it ({str(err).splitlines()[0][:200]})",
                             field="path") from None
    return model


def load_initial_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors in federated order and its metadata. Raises :class:`ModelFileError`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    where = repr(str(path))
    if not Path(path).is_file():
        raise ModelFileError(f"{where}: no such file (write it with fedveil.save_initial_model)")
    try:
        loaded = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{where}: not a safetensors model file ({err})") from None
    order = _order(metadata, loaded, where)
    for name in order:
        value = loaded[name]
        if not value.is_floating_point():
            raise ModelFileError(f"{where}: tensor {name!r} has dtype {value.dtype}, not a floating-point type")
        if not bool(torch.isfinite(value).all()):
            raise ModelFileError(f"{where}: tensor {name!r} holds NaN or infinite values")
    if not order:
        raise ModelFileError(f"{where}: the file holds no tensors")
    return {name: loaded[name] for name in order}, metadata


def _order(metadata: dict[str, str], loaded: dict[str, torch.Tensor], where: str) -> list[str]:
    raw = metadata.get("fedveil.order")
    if raw is None:
        return sorted(loaded)
    try:
        order = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{where}: its fedveil.order metadata is not JSON") from None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(loaded) or len(set(order)) != len(order):
        raise ModelFileError(f"{where}: its fedveil.order metadata does not list the file's tensors once each")
    return [str(n) for n in order]


class FileModel(nn.Module):
    """The model file's tensors as an ``nn.Module`` with the same state-dict names (no user code needed)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in tensors.items():
            *parents, leaf = name.split(".")
            owner: nn.Module = self
            for part in parents:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))

    def forward(self, *args: object) -> torch.Tensor:
        raise ModelFileError("a model file holds weights only: the server cannot run it (the sites do)",
                             field="model")


def model_file_task(path: str | Path) -> Task:
    """The job a model file describes: its tensors are the initial global model, its name is
    ``model:<file name>`` (loop sites send no task name; they check the spec at Join instead)."""
    tensors, metadata = load_initial_model(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    spec = ModelSpec.of(tensors)

    def train_epoch(model: nn.Module, loader: object, optimizer: object) -> float:
        raise ModelFileError(f"a model-file job ({Path(path).name}) has no training function: its sites "
                             "train in their own loops (fedveil.federate)", field="model")

    def evaluate(model: nn.Module, dataset: object) -> dict[str, float]:
        raise ModelFileError(f"a model-file job ({Path(path).name}) has no evaluation function: its sites "
                             "evaluate in their own loops (federate(evaluate=...))", field="model")

    return Task(
        name=f"model:{Path(path).name}",
        schema=DataSchema(features=(), label=ColumnSpec("label")),
        build_model=lambda: FileModel(tensors),
        train_epoch=train_epoch,  # type: ignore[arg-type]
        evaluate=evaluate,  # type: ignore[arg-type]
        metadata={"model_file": str(path), "sha256": digest, "dp": metadata.get("fedveil.dp", ""),
                  "values": str(spec.size), "tensors": str(len(spec.tensors))},
    )


def job_task(task: str, model: str) -> Task:
    """The job's task: from ``--model`` (a model file, no user code imported) or ``--task``."""
    if model:
        return model_file_task(model)
    from fedveil.task import load_task

    return load_task(task)
