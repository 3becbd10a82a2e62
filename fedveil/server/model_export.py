"""The global model of a run, at a round, as a standard file (``fedveil export``).

Three formats, each loadable without fedveil:

- ``safetensors``: the model's ``state_dict`` (``safetensors.torch.load_file``), with metadata
  strings: the run, the round, the user-level ε spent up to that round (``none`` without
  user-level DP) and its δ, the task's name and reference, the DP mode and the input shape.
- ``torch``: ``torch.save`` of ``{"state_dict": ..., "metadata": ...}`` (plain tensors and
  strings: ``torch.load(..., weights_only=True)`` reads it).
- ``onnx``: the model traced by ``torch.onnx`` on the task's input shape (a batch of rows of its
  schema's features; the batch axis is dynamic), with the same metadata as ONNX metadata
  properties. It needs the optional ``export`` extra (``onnx``; ``onnxruntime`` to run it).

The model is the store's checkpoint of that round (what the sites received next), loaded into
the task's own module, so the file predicts exactly as the global model does. Only released
values leave the store: the checkpoint and the ledger's ε, never an update or a secret.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from fedveil.errors import FedveilError
from fedveil.server.store import RunStore, StoreError, is_run_store
from fedveil.task import Task, TaskLoadError, load_task, vector_to_model

FORMATS = ("safetensors", "onnx", "torch")
MAX_ROUND = 2**63 - 1
"""The largest round a store can hold (SQLite's INTEGER); a larger one is refused naming ``round``."""
ONNX_OPSET = 17


class ExportError(FedveilError, ValueError):
    """The export cannot be made; ``field`` names the input at fault (store, run, round, format, out)."""


@dataclass(frozen=True)
class ExportRequest:
    """What to export: ``run_id`` None is the latest run, ``round`` None its latest checkpoint."""

    store: Path
    out: Path
    format: str = "safetensors"
    run_id: str | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"must be one of {', '.join(FORMATS)} (got {self.format!r})", field="format")
        if self.round is not None and self.round < 0:
            raise ExportError(f"must be 0 (the initial model) or more (got {self.round})", field="round")
        if self.round is not None and self.round > MAX_ROUND:
            raise ExportError(f"no round {self.round} (rounds are at most {MAX_ROUND})", field="round")


@dataclass(frozen=True)
class ExportedModel:
    """The global model of one round, with the metadata every format carries."""

    model: torch.nn.Module
    task: Task
    metadata: dict[str, str]

    @property
    def input_shape(self) -> tuple[int, int]:
        """One row of the task's features (the batch axis is dynamic in ONNX)."""
        return (1, len(self.task.schema.features))


def load_exported_model(request: ExportRequest) -> ExportedModel:
    """The run's global model at the requested round, in the task's module, with its metadata."""
    if not request.store.is_file() or not is_run_store(request.store):
        raise ExportError(f"{str(request.store)!r} is not a fedveil run store", field="store")
    try:
        with RunStore(request.store) as store:
            run = store.run(request.run_id) if request.run_id is not None else store.latest_run()
            if run is None:
                if request.run_id is None:
                    raise ExportError(f"{str(request.store)!r} holds no runs", field="store")
                known = ", ".join(r.run_id for r in store.runs()) or "none"
                raise ExportError(f"no run {request.run_id!r} in {str(request.store)!r} (runs: {known})",
                                  field="run")
            checkpoint = store.checkpoint(run.run_id, request.round)
            if checkpoint is None:
                last = store.completed_rounds(run.run_id)
                raise ExportError(f"run {run.run_id} has no round {request.round} (its checkpoints are rounds "
                                  f"0 to {last}; 0 is the initial model)", field="round")
            ledger_json = store.ledger_json(run.run_id)
    except ExportError:
        raise
    except (StoreError, sqlite3.DatabaseError) as err:
        raise ExportError(str(err), field="store") from None
    except (ValueError, RecursionError) as err:  # a checkpoint's state that does not parse (a crafted store)
        raise ExportError(f"{str(request.store)!r}: a checkpoint cannot be read ({_first_line(err)})",
                          field="store") from None
    reference = str(run.config.get("task", ""))
    try:
        task = load_task(reference, call_factories=False)  # the store is a file: never call what it names
    except TaskLoadError as err:
        raise ExportError(f"the run's task cannot be loaded here: {err}", field="store") from None
    try:
        model = vector_to_model(checkpoint.model, task.build_model()).eval()
        epsilon, delta, level = _round_epsilon(ledger_json, checkpoint.version)
    except (ValueError, RecursionError) as err:  # a checkpoint or ledger that does not fit (a crafted store)
        raise ExportError(f"round {checkpoint.version} of run {run.run_id} cannot be read: "
                          f"{_first_line(err)}", field="store") from None
    metadata = {
        "run_id": run.run_id,
        "round": str(checkpoint.version),
        "epsilon": "none" if epsilon is None else repr(epsilon),
        "delta": "none" if delta is None else repr(delta),
        "epsilon_level": level,
        "task": task.name,
        "task_reference": reference,
        "dp": str(run.config.get("dp", "none")),
        "input_shape": json.dumps([None, len(task.schema.features)]),
        "input_features": json.dumps([c.name for c in task.schema.features]),
        "exporter": "fedveil",
    }
    return ExportedModel(model, task, metadata)


def _round_epsilon(ledger_json: str | None, round_number: int) -> tuple[float | None, float | None, str]:
    """(ε, δ, level) after ``round_number`` (:func:`fedveil.server.privacy_view.spent_epsilon`); Nones without DP."""
    if ledger_json is None:
        return None, None, "user"
    from fedveil.dp.ledger import PrivacyLedger
    from fedveil.server.privacy_view import spent_epsilon

    spent = spent_epsilon(PrivacyLedger.from_json(ledger_json), round_number)
    if spent is None:
        return None, None, "user"
    return spent.epsilon, spent.delta, "user" if spent.user_level else "sample (the largest site's, as reported)"


def export_model(request: ExportRequest) -> ExportedModel:
    """Write the requested model to ``request.out`` in ``request.format``; returns what was written."""
    exported = load_exported_model(request)
    if not request.out.parent.is_dir():
        raise ExportError(f"directory {str(request.out.parent)!r} does not exist", field="out")
    if request.out.is_dir():
        raise ExportError(f"{str(request.out)!r} is a directory; give the file to write", field="out")
    writer = {"safetensors": _write_safetensors, "torch": _write_torch, "onnx": _write_onnx}[request.format]
    try:
        writer(exported, request.out)
    except OSError as err:
        raise ExportError(f"cannot write {str(request.out)!r}: {err.strerror or err}", field="out") from None
    except (RuntimeError, SafetensorError) as err:  # torch.save and safetensors wrap the OS's refusal
        raise ExportError(f"cannot write {str(request.out)!r}: {_first_line(err)}", field="out") from None
    return exported


def _first_line(err: BaseException) -> str:
    """A library's message for a one-line error: its first line, at most 200 characters."""
    return (str(err).splitlines() or [""])[0][:200]


def safetensors_bytes(exported: ExportedModel) -> bytes:
    """The safetensors file of :func:`export_model` as bytes (the dashboard's model download)."""
    from safetensors.torch import save

    return bytes(save(_state(exported.model), metadata={"format": "pt", **exported.metadata}))


def download_name(exported: ExportedModel) -> str:
    """``<run>-round<N>.safetensors``: run ids are ``[A-Za-z0-9_.-]``, safe in a header."""
    return f"{exported.metadata['run_id']}-round{exported.metadata['round']}.safetensors"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _write_safetensors(exported: ExportedModel, out: Path) -> None:
    from safetensors.torch import save_file

    save_file(_state(exported.model), str(out), metadata={"format": "pt", **exported.metadata})


def _write_torch(exported: ExportedModel, out: Path) -> None:
    torch.save({"state_dict": _state(exported.model), "metadata": dict(exported.metadata)}, out)


def _write_onnx(exported: ExportedModel, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("onnx is not installed: it comes with the optional 'export' extra "
                          "(pip install 'fedveil[export]')", field="format") from None
    example = torch.zeros(exported.input_shape, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                exported.model, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                input_names=["features"], output_names=["output"],
                dynamic_axes={"features": {0: "batch"}, "output": {0: "batch"}},
            )
        proto: Any = onnx.load(str(tmp))
        for key, value in exported.metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(out))
    finally:
        tmp.unlink(missing_ok=True)  # the exporter's scratch file, also when writing failed
