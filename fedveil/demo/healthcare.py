"""The healthcare task: breast-cancer risk from 30 nuclear measurements (WDBC).

``fedveil.demo.healthcare:task`` is a :class:`fedveil.task.Task`, so the same task runs in
the demo, in ``fedveil server``/``fedveil client --task fedveil.demo.healthcare:task`` and in
``fedveil simulate``. Site files are CSV with the 30 feature columns (raw clinical units, see
:data:`fedveil.demo.data.FEATURE_NAMES`) followed by ``malignant`` (0 or 1).

The model is logistic regression behind a fixed scaling layer (public reference ranges, see
:mod:`fedveil.demo.data`): linear, so that the clinician page can give each feature's *exact*
contribution to the predicted log-odds, and small (31 parameters), so that DP-SGD noise,
which grows with the dimension, costs little accuracy. The scaling layer's bounds are
non-persistent buffers: they are part of the code, not of the state dict that is trained,
masked and aggregated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.demo.data import FEATURE_DESCRIPTIONS, FEATURE_NAMES, LABEL_NAME, DemoSplit, make_split, public_ranges
from fedveil.task import ColumnSpec, DataSchema, Task, TaskTerms, describe_margin, float32_decimal, risk_level

#: A measurement above this many times its public reference range's top is refused: no tumour
#: measures that (WDBC's largest values are within 1.1x), and a site file with such values is in
#: other units or corrupt. Unbounded, one hospital of 60 rows at 3e38 took test accuracy from 0.89
#: to 0.13 without DP (the web attacker review): within "bounded influence", but a typo should not.
MAX_REFERENCE_MULTIPLE = 10.0
SCHEMA = DataSchema(
    # every measurement is a size, a count or a ratio: never negative
    features=tuple(ColumnSpec(name, "float", FEATURE_DESCRIPTIONS[name], minimum=0.0,
                              maximum=float(f"{MAX_REFERENCE_MULTIPLE * high:.3g}"))
                   for name, high in zip(FEATURE_NAMES, public_ranges()[1], strict=True)),
    label=ColumnSpec(LABEL_NAME, "binary", "1 if the mass is malignant, 0 if benign"),
    max_rows=100_000,
)


FeatureTransform = Literal["linear", "log"]
#: The tuned choice (cross-validated in :mod:`fedveil.demo.tuning`).
FEATURE_TRANSFORM: FeatureTransform = "log"


class RangeScaler(nn.Module):
    """Maps raw measurements to about [-1, 1] with fixed public bounds (no trainable state).

    ``linear``: ``(x - centre) / half-width`` of the reference range. ``log``: the same on
    ``log(x + offset)`` (offset = 10 % of the range, so zeros are fine), which evens out the
    right-skewed areas and errors.
    """

    def __init__(self, transform: FeatureTransform = "linear") -> None:
        super().__init__()
        if transform not in ("linear", "log"):
            raise ValueError(f"transform must be 'linear' or 'log' (got {transform!r})")
        self.transform = transform
        lo, hi = public_ranges()
        self.register_buffer("offset", torch.tensor(0.1 * (hi - lo), dtype=torch.float32), persistent=False)
        if transform == "log":
            off = 0.1 * (hi - lo)
            lo, hi = np.log(np.maximum(lo, 0.0) + off), np.log(hi + off)
        self.register_buffer("center", torch.tensor((lo + hi) / 2.0, dtype=torch.float32), persistent=False)
        self.register_buffer("half_width", torch.tensor((hi - lo) / 2.0, dtype=torch.float32), persistent=False)

    offset: torch.Tensor
    center: torch.Tensor
    half_width: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform == "log":
            x = torch.log(torch.clamp(x, min=0.0) + self.offset)
        return (x - self.center) / self.half_width


class RiskModel(nn.Module):
    """Fixed scaling, then logistic regression: ``forward`` returns the malignancy log-odds."""

    def __init__(self, transform: FeatureTransform = FEATURE_TRANSFORM) -> None:
        super().__init__()
        self.scale = RangeScaler(transform)
        self.linear = nn.Linear(len(FEATURE_NAMES), 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.scale(x)).squeeze(-1)


def build_model() -> nn.Module:
    return RiskModel()


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One local epoch of binary cross-entropy; returns the mean loss over the examples seen.

    Poisson sampling (Opacus) can draw an empty batch; the step is still taken (the DP
    optimizer then releases pure noise), because skipping it would reveal that the batch was
    empty and would desynchronise the step count from the accountant.
    """
    model.train()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    total, seen = 0.0, 0
    for features, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        logits = model(features)
        n = int(labels.shape[0])
        loss = loss_fn(logits, labels.float()) / max(n, 1)
        loss.backward()
        optimizer.step()
        total += float(loss.item()) * n
        seen += n
    return total / seen if seen else float("nan")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties count one half); NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate(model: nn.Module, dataset: TensorDataset) -> dict[str, float]:
    """Loss (mean binary cross-entropy), accuracy at probability 0.5, and ROC AUC."""
    features, labels = dataset.tensors[0], dataset.tensors[1].float()
    was_training = model.training  # leave the model as we found it (DP-SGD needs training mode)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(features)
            loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels).item())
    finally:
        model.train(was_training)
    probs = torch.sigmoid(logits).numpy()
    y = labels.numpy()
    accuracy = float(((probs >= 0.5) == (y >= 0.5)).mean())
    return {"loss": loss, "accuracy": accuracy, "auc": roc_auc(y, probs)}


def synthetic_data(client_index: int, n_clients: int, seed: int) -> TensorDataset:
    """A hospital's share of the demo split (real WDBC patients, not synthetic rows).

    Follows the :class:`~fedveil.task.Task` hook used by simulations: client ``client_index``
    of ``n_clients`` gets that hospital's data from :func:`fedveil.demo.data.make_split`.
    """
    from fedveil.demo.data import make_split

    if not 0 <= client_index < n_clients:
        raise ValueError(f"client_index {client_index} is outside 0..{n_clients - 1}")
    site = make_split(n_clients, seed).hospitals[client_index]
    return TensorDataset(torch.from_numpy(site.features), torch.from_numpy(site.labels))


task = Task(
    name="healthcare-wdbc",
    schema=SCHEMA,
    build_model=build_model,
    train_epoch=train_epoch,
    evaluate=evaluate,
    learning_rate=2.0,
    batch_size=32,
    local_epochs=1,
    synthetic_data=synthetic_data,
    explain=lambda model, features: assess(model, features).to_dict(),
    examples=lambda: example_patients(),
    metrics=("loss", "accuracy", "auc"),
    terms=TaskTerms(record="patient", records="patients", predictor="Clinician", predict_action="Assess risk",
                    outcome="risk of malignancy", result_title="Risk from the current global model"),
    metadata={
        "dataset": "Wisconsin Diagnostic Breast Cancer (scikit-learn load_breast_cancer)",
        "label": "malignant (1) or benign (0)",
        "model": "logistic regression behind fixed public-range scaling",
    },
)


def task_with(transform: FeatureTransform) -> Task:
    """:data:`task` with the model's features scaled by ``transform`` (the recipe search tries both).

    The scaling layer holds no trained state, so the two variants train, mask and aggregate the
    same 31 parameters under the same task name; only the model's input scaling differs.
    """
    if transform not in ("linear", "log"):
        raise ValueError(f"feature_transform must be 'linear' or 'log' (got {transform!r})")
    if transform == FEATURE_TRANSFORM:
        return task
    return dataclasses.replace(task, build_model=functools.partial(RiskModel, transform))


# ---------------------------------------------------------------------------------------------
# Clinician view: risk, its level, a confidence description and exact per-feature contributions


@dataclass(frozen=True)
class Contribution:
    feature: str
    value: float
    contribution: float  # to the log-odds, exact for this linear model

    @property
    def direction(self) -> str:
        return "raises risk" if self.contribution > 0 else "lowers risk"


@dataclass(frozen=True)
class RiskAssessment:
    probability: float
    logit: float
    level: str
    confidence: str
    baseline_logit: float
    contributions: tuple[Contribution, ...]  # largest magnitude first

    def to_dict(self, top: int = 5) -> dict[str, object]:
        return {
            "probability": self.probability,
            "logit": self.logit,
            "risk_level": self.level,
            "confidence": self.confidence,
            "baseline_logit": self.baseline_logit,
            "top_features": [
                {
                    "feature": c.feature,
                    "value": c.value,
                    "contribution": c.contribution,
                    "direction": c.direction,
                }
                for c in self.contributions[:top]
            ],
        }


def confidence_description(probability: float, out_of_range: Sequence[str]) -> str:
    """Plain words for how far the model is from undecided (|log-odds|), and data caveats."""
    text = describe_margin(math.log(max(probability, 1e-12)) - math.log(max(1.0 - probability, 1e-12)))
    if out_of_range:
        text += "; outside the reference range: " + ", ".join(out_of_range) + " (treat with caution)"
    return text + ". A screening aid, not a diagnosis."


def assess(model: nn.Module, features: np.ndarray) -> RiskAssessment:
    """Risk for one patient (raw units) with exact linear contributions to the log-odds.

    Contribution of feature j = w_j · z_j, where z is the range-scaled input, so the log-odds
    equal the bias plus the sum of the contributions exactly.
    """
    if not isinstance(model, RiskModel):
        raise TypeError(f"expected the healthcare RiskModel, got {type(model).__name__}")
    x = torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(1, -1)
    with torch.no_grad():
        z = model.scale(x)[0]
        w = model.linear.weight[0]
        b = float(model.linear.bias[0])
        contrib = (w * z).numpy().astype(np.float64)
    logit = b + float(contrib.sum())
    if not math.isfinite(logit):
        raise ValueError("the model's output is not finite for these values; check the measurements' units")
    prob = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
    lo, hi = public_ranges()
    raw = x[0].numpy()
    out_of_range = [FEATURE_NAMES[i] for i in range(len(FEATURE_NAMES)) if raw[i] < lo[i] or raw[i] > hi[i]]
    order = np.argsort(-np.abs(contrib), kind="stable")
    contributions = tuple(Contribution(FEATURE_NAMES[i], float(raw[i]), float(contrib[i])) for i in order)
    return RiskAssessment(
        probability=prob,
        logit=logit,
        level=risk_level(prob),
        confidence=confidence_description(prob, out_of_range),
        baseline_logit=b,
        contributions=contributions,
    )


def example_patients(split: DemoSplit | None = None) -> list[dict[str, Any]]:
    """Three held-out patients for the clinician page: clearly benign, clearly malignant, borderline.

    From the test set of ``split`` (default: the demo's split), which no training ever sees.
    """
    split = split if split is not None else make_split()
    x, y = split.test.features, split.test.labels
    area = x[:, FEATURE_NAMES.index("worst_area")]
    benign = np.where(y == 0)[0]
    malignant = np.where(y == 1)[0]
    picks = [
        ("Example A (held-out patient, benign)", int(benign[np.argmin(area[benign])])),
        ("Example B (held-out patient, malignant)", int(malignant[np.argmax(area[malignant])])),
        ("Example C (held-out patient, borderline size)", int(np.argmin(np.abs(area - np.median(area))))),
    ]

    def clean(v: np.float32) -> float:  # 21.71, not 21.709999084472656
        return float(float32_decimal(float(v)) or v)

    return [{"label": label, "features": dict(zip(FEATURE_NAMES, (clean(v) for v in x[i]), strict=True))}
            for label, i in picks]
