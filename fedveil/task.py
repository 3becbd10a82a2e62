"""Tasks: what a federation trains, and on what data.

A task bundles the model factory, the local training and evaluation functions, and the
schema of a site's data file. The server uses it to build the initial global model and to
evaluate; clients use it to load their local data and to train. Name one on the command line
as ``--task package.module:attr`` or ``--task package.module`` (which must define ``task``).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.errors import FedveilError

ColumnType = Literal["float", "int", "binary"]


class SchemaError(FedveilError, ValueError):
    """A data file does not match the task's schema. The message names the column or row at fault."""


class TaskLoadError(FedveilError, ValueError):
    """A ``--task`` reference cannot be resolved to a :class:`Task`."""


#: Magnitudes at or above this round to infinity in float32 (the model's precision): 2^128 - 2^103,
#: halfway between the largest float32 and 2^128.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: ColumnType = "float"
    description: str = ""
    #: Smallest allowed value (e.g. 0 for a measurement that is never negative); None = no bound.
    minimum: float | None = None
    #: Largest allowed value (e.g. far above any real measurement: a wrong unit); None = no bound.
    maximum: float | None = None

    def check(self, value: float, where: str, shown: str) -> float:
        """``value`` if it fits this column, else a :class:`SchemaError` naming ``where`` and the column."""
        if not math.isfinite(value):
            raise SchemaError(f"{where}{self.name!r}: {shown} is not a finite number")
        if abs(value) >= FLOAT32_OVERFLOW:
            raise SchemaError(f"{where}{self.name!r}: {shown} is out of range (magnitude above 3.4e+38)")
        if self.dtype in ("int", "binary") and value != int(value):
            raise SchemaError(f"{where}{self.name!r}: {shown} is not an integer")
        if self.dtype == "binary" and value not in (0.0, 1.0):
            raise SchemaError(f"{where}{self.name!r}: {shown} must be 0 or 1")
        if self.minimum is not None and value < self.minimum:
            raise SchemaError(f"{where}{self.name!r}: {shown} is below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise SchemaError(f"{where}{self.name!r}: {shown} is above the maximum {self.maximum:g}")
        return value


@dataclass(frozen=True)
class DataSchema:
    """Columns of a site's CSV file: the features, in model order, then the label."""

    features: tuple[ColumnSpec, ...]
    label: ColumnSpec
    max_rows: int = 1_000_000
    #: Most columns a file's header may have (never fewer than the schema's own): far above any
    #: real site file, and a bound on the work an arbitrary header costs before it is refused.
    max_columns: int = 10_000

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.features] + [self.label.name]

    def parse_csv(self, data: bytes | str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Parse and validate CSV content into float32 features and float32 labels.

        Raises :class:`SchemaError` naming the problem (missing or extra columns, a value of the
        wrong type, an empty file, a non-CSV file, too many rows or columns).
        """
        if isinstance(data, Path):
            raw = data.read_bytes()
        elif isinstance(data, str):
            raw = data.encode()
        else:
            raw = data
        if not raw.strip():
            raise SchemaError("the file is empty")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise SchemaError("the file is not UTF-8 text (is it a CSV file?)") from err
        if "\x00" in text:
            raise SchemaError("the file contains binary data (is it a CSV file?)")
        reader = csv.reader(io.StringIO(text))
        try:
            header = [h.strip() for h in next(reader)]
        except (StopIteration, csv.Error) as err:
            raise SchemaError(f"the file is not valid CSV: {err}") from err
        max_columns = max(self.max_columns, len(self.column_names))
        if len(header) > max_columns:
            raise SchemaError(f"too many columns in the header ({len(header)}; the limit is {max_columns})")
        duplicates = sorted(h for h, n in Counter(header).items() if n > 1)
        if duplicates:
            raise SchemaError("duplicate columns in the header: " + ", ".join(repr(h) for h in duplicates))
        expected = self.column_names
        mismatch = describe_name_mismatch(
            [c for c in expected if c not in header],
            [c if c else "(a column with an empty name)" for c in header if c not in expected],
            missing_label="missing columns", extra_label="unexpected columns",
        )
        if mismatch:
            raise SchemaError(mismatch)
        order = [header.index(c) for c in expected]
        specs = [*self.features, self.label]
        rows: list[list[float]] = []
        try:
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise SchemaError(f"row {line_no}: expected {len(header)} values, found {len(row)}")
                if len(rows) >= self.max_rows:
                    raise SchemaError(f"too many rows (the limit is {self.max_rows})")
                rows.append([_parse_cell(row[i], spec, line_no) for i, spec in zip(order, specs, strict=True)])
        except csv.Error as err:
            raise SchemaError(f"the file is not valid CSV: {err}") from err
        if not rows:
            raise SchemaError("the file has a header but no data rows")
        table = np.asarray(rows, dtype=np.float32)
        return table[:, :-1], table[:, -1]

    def parse_values(self, values: Mapping[str, object]) -> np.ndarray:
        """One row of features given by name (e.g. a form or JSON body) as float32, in model order.

        Accepts numbers and plain decimal strings; refuses booleans, other types, missing or
        unknown names, and values the column does not allow, naming the feature at fault.
        """
        names = [c.name for c in self.features]
        mismatch = describe_name_mismatch(
            [n for n in names if n not in values or values[n] in ("", None)], [k for k in values if k not in names],
            missing_label="missing", extra_label="unknown features",
        )
        if mismatch:
            raise SchemaError(mismatch)
        out = np.empty(len(names), dtype=np.float32)
        for i, spec in enumerate(self.features):
            out[i] = spec.check(_strict_number(values[spec.name], spec.name), "feature ", repr(values[spec.name]))
        return out

    def to_csv(self, features: np.ndarray, labels: np.ndarray) -> str:
        """Render rows in this schema (the inverse of :meth:`parse_csv`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.column_names)
        specs = [*self.features, self.label]
        for x_row, y in zip(features, labels, strict=True):
            values = [*x_row.tolist(), float(y)]
            writer.writerow([_format_cell(v, s) for v, s in zip(values, specs, strict=True)])
        return out.getvalue()


def describe_name_mismatch(
    missing: Sequence[str], extra: Sequence[object], *, missing_label: str, extra_label: str
) -> str:
    """One message naming every missing and every unexpected name ("" when there are none)."""
    parts = []
    if missing:
        parts.append(f"{missing_label}: " + ", ".join(missing))
    if extra:
        parts.append(f"{extra_label}: " + ", ".join(map(str, extra)))
    return "; ".join(parts)


def _parse_cell(cell: str, spec: ColumnSpec, line_no: int) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        raise SchemaError(
            f"row {line_no}, column {spec.name!r}: {text!r} is not a number ({spec.dtype} expected)"
        ) from None
    return spec.check(value, f"row {line_no}, column ", repr(text))


def _strict_number(value: object, name: str) -> float:
    """A JSON/form value as a float: int, float or a plain decimal string (no bools, no ``1_000``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SchemaError(f"feature {name!r}: {value!r} is not a number")
    if isinstance(value, str) and not _NUMBER.match(value.strip()):
        raise SchemaError(f"feature {name!r}: {value!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise SchemaError(f"feature {name!r}: the value is out of range") from None


def float32_decimal(value: float) -> str | None:
    """The shortest decimal of a value that is exactly a float32 (19.59, not 19.59000015258789), if
    reading it back through float64, as :meth:`DataSchema.parse_csv` does, gives the same float32."""
    if float(np.float32(value)) != float(value):
        return None
    text = str(np.float32(value))
    return text if float(np.float32(float(text))) == float(value) else None


def _format_cell(value: float, spec: ColumnSpec) -> str:
    if spec.dtype in ("int", "binary"):
        return str(int(value))
    return float32_decimal(value) or repr(float(value))


TrainFn = Callable[[nn.Module, DataLoader, torch.optim.Optimizer], float]
EvalFn = Callable[[nn.Module, TensorDataset], dict[str, float]]


@dataclass(frozen=True)
class TaskTerms:
    """The words a task's dashboard uses for what it predicts from (a *record*) and what it predicts:
    the generic defaults, or a domain's own (the healthcare demo speaks of patients and a clinician).
    The server's pages hold no domain wording; they show these."""

    record: str = "record"
    records: str = "records"
    predictor: str = "Prediction"
    """The name of the page that asks the global model for one prediction."""
    predict_action: str = "Predict"
    outcome: str = "probability of the positive class"
    """What the model's probability means, after "NN.N %"."""
    result_title: str = "Prediction from the current global model"


@dataclass
class Task:
    """A federated learning task.

    ``train_epoch`` runs one local epoch with the optimizer and loader it is given (which may be
    Opacus-wrapped) and returns the mean training loss. ``evaluate`` returns metrics, at least
    ``loss`` and ``accuracy``. ``synthetic_data`` makes a client's data for simulations and tests.
    ``explain`` (optional) turns the model and one row of features into the dashboard's risk view
    (probability, level, confidence words, top contributing features); ``examples`` (optional)
    lists example inputs for it (``{"label": ..., "features": {name: value}}``). ``metrics`` names
    the metrics federated evaluation sums securely over the cohort (example-weighted means).
    """

    name: str
    schema: DataSchema
    build_model: Callable[[], nn.Module]
    train_epoch: TrainFn
    evaluate: EvalFn
    learning_rate: float = 0.1
    batch_size: int = 32
    local_epochs: int = 1
    synthetic_data: Callable[[int, int, int], TensorDataset] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    explain: Callable[[nn.Module, np.ndarray], dict[str, Any]] | None = None
    examples: Callable[[], list[dict[str, Any]]] | None = None
    metrics: tuple[str, ...] = ("loss", "accuracy")
    terms: TaskTerms = field(default_factory=TaskTerms)

    def make_optimizer(self, params: Sequence[nn.Parameter] | object) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.learning_rate)  # type: ignore[arg-type]

    def load_dataset(self, path: str | Path) -> TensorDataset:
        features, labels = self.schema.parse_csv(Path(path))
        return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))


def risk_level(probability: float) -> str:
    """The risk band of a predicted probability: low < 0.2 <= moderate < 0.5 <= high < 0.8 <= very high."""
    if probability < 0.2:
        return "low"
    if probability < 0.5:
        return "moderate"
    if probability < 0.8:
        return "high"
    return "very high"


def describe_margin(log_odds_margin: float) -> str:
    """Plain words for how far a binary prediction is from undecided, by ``|log-odds|``.

    The thresholds 0.8, 2 and 4 correspond to probabilities of about 0.69, 0.88 and 0.98 for the
    more likely class. Shared by every explanation view so that the same margin reads the same.
    """
    margin = abs(log_odds_margin)
    if margin >= 4.0:
        return "confident: the measurements point clearly one way"
    if margin >= 2.0:
        return "fairly confident"
    if margin >= 0.8:
        return "moderately confident: some measurements point the other way"
    return "uncertain: close to the decision boundary"


def load_task(reference: str, *, call_factories: bool = True) -> Task:
    """Resolve ``module:attr`` or ``module`` (with a ``task`` attribute) to a :class:`Task`.

    ``call_factories=False`` for a reference read from a file (a run store): a function named there is
    refused rather than called, so a crafted store cannot make a command call ``tempfile:mkdtemp``."""
    module_name, _, attr = reference.partition(":")
    if not module_name:
        raise TaskLoadError(f"{reference!r}: expected 'package.module:attr' or 'package.module'", field="task")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskLoadError(f"cannot import module {module_name!r}: {err}", field="task") from err
    attr = attr or "task"
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise TaskLoadError(f"module {module_name!r} has no attribute {attr!r}", field="task") from None
    if inspect.isfunction(obj) and not call_factories:
        raise TaskLoadError(f"{attr!r} is a function; a task read from a file must name a Task object",
                            field="task")
    if inspect.isfunction(obj):  # a factory: ``module:make_task``
        try:
            obj = obj()
        except TypeError as err:
            raise TaskLoadError(f"{attr!r} is a function that cannot build a task ({err})",
                                field="task") from None
    if not isinstance(obj, Task):
        raise TaskLoadError(f"{attr!r} is a {type(obj).__name__}, not a fedveil Task", field="task")
    return obj


def model_to_vector(model: nn.Module | dict[str, torch.Tensor]) -> np.ndarray:
    """The model's floating-point state (parameters and float buffers) as one flat float32 vector.

    Entries follow ``state_dict()`` order; integer buffers (e.g. ``num_batches_tracked``) are not
    federated. Opacus' ``_module.`` prefix makes no difference: only the order and shapes count.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    parts = [t.detach().reshape(-1).to(torch.float32).cpu().numpy() for t in state.values() if t.is_floating_point()]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def vector_to_model(vector: np.ndarray, model: nn.Module) -> nn.Module:
    """Load a flat vector from :func:`model_to_vector` into ``model`` in place and return it."""
    state = model.state_dict()
    expected = sum(t.numel() for t in state.values() if t.is_floating_point())
    flat = np.asarray(vector)
    if flat.ndim != 1 or flat.shape[0] != expected:
        raise ValueError(f"vector has shape {flat.shape}, the model needs ({expected},)")
    offset = 0
    new_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            n = tensor.numel()
            chunk = torch.from_numpy(np.array(flat[offset : offset + n], dtype=np.float32))
            new_state[key] = chunk.reshape(tensor.shape).to(tensor.dtype)
            offset += n
        else:
            new_state[key] = tensor
    model.load_state_dict(new_state)
    return model
