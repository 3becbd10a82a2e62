"""A synthetic binary-classification task that needs no data files.

Every site's data is drawn from one ground-truth linear model (fixed by the federation's seed),
with a per-site shift of the feature distribution so that the sites are not identically
distributed, which is the usual situation in federated learning. ``synthetic_data(i, n, seed)``
gives site ``i`` of ``n`` its data; the same arguments always give the same tensors, in every
process, so an in-process simulation and a federation of real processes train on identical data.

The CSV schema has ten float columns ``x0`` … ``x9`` and a binary label ``y``; use
``write_site_csv`` to write a site's data in that schema for ``fedveil client --data``.

Tasks:

- ``fedveil.tasks.synthetic:task`` – logistic regression (11 parameters).
- ``fedveil.tasks.synthetic:mlp`` – a 10-16-1 MLP (193 parameters).
- ``fedveil.tasks.synthetic:make_task(n_features=..., hidden=...)`` for other sizes, e.g. a wide
  model for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.task import ColumnSpec, DataSchema, Task

N_FEATURES = 10
SAMPLES_PER_SITE = 200


def schema_for(n_features: int) -> DataSchema:
    """The CSV schema: float columns ``x0`` … ``x{n-1}`` then the binary label ``y``."""
    return DataSchema(
        features=tuple(ColumnSpec(f"x{i}", "float", f"synthetic feature {i}") for i in range(n_features)),
        label=ColumnSpec("y", "binary", "synthetic class label"),
    )


def generate(
    client_index: int,
    n_clients: int,
    seed: int,
    *,
    n_features: int = N_FEATURES,
    samples: int = SAMPLES_PER_SITE,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, ``samples × n_features``) and labels (float32, 0/1) for one site.

    The ground-truth weights depend only on ``seed``; the site's feature shift and its samples
    depend on ``(seed, client_index)``. Labels are Bernoulli draws from the logistic model, so
    the Bayes accuracy is below 100% and training curves are realistic.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1 (got {n_clients})")
    if not 0 <= client_index < n_clients:
        raise ValueError(f"client_index must be in [0, {n_clients}) (got {client_index})")
    if samples < 1:
        raise ValueError(f"samples must be at least 1 (got {samples})")
    truth_rng = np.random.default_rng([seed, 0x5EED])
    w_true = truth_rng.normal(0.0, 1.0, n_features) * 1.5
    b_true = float(truth_rng.normal(0.0, 0.5))
    site_rng = np.random.default_rng([seed, 1, client_index])
    shift = site_rng.normal(0.0, 0.5, n_features)
    features = site_rng.normal(0.0, 1.0, (samples, n_features)) + shift
    logits = features @ w_true + b_true
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = (site_rng.random(samples) < probabilities).astype(np.float32)
    return features.astype(np.float32), labels


def make_task(
    n_features: int = N_FEATURES,
    hidden: int = 0,
    *,
    samples: int = SAMPLES_PER_SITE,
    learning_rate: float = 0.1,
    batch_size: int = 32,
    local_epochs: int = 1,
    name: str | None = None,
) -> Task:
    """Build a synthetic task: logistic regression when ``hidden`` is 0, else a one-hidden-layer MLP."""
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1 (got {n_features})")
    if hidden < 0:
        raise ValueError(f"hidden must be 0 or more (got {hidden})")

    def build_model() -> nn.Module:
        if hidden == 0:
            return nn.Sequential(nn.Linear(n_features, 1))
        return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def synthetic_data(client_index: int, n_clients: int, seed: int) -> TensorDataset:
        x, y = generate(client_index, n_clients, seed, n_features=n_features, samples=samples)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    label = name or ("synthetic-logreg" if hidden == 0 else f"synthetic-mlp{hidden}")
    return Task(
        name=label,
        schema=schema_for(n_features),
        build_model=build_model,
        train_epoch=train_epoch,
        evaluate=evaluate,
        learning_rate=learning_rate,
        batch_size=batch_size,
        local_epochs=local_epochs,
        synthetic_data=synthetic_data,
        metadata={"n_features": str(n_features), "hidden": str(hidden)},
    )


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One pass over ``loader`` with binary cross-entropy; returns the mean loss per example."""
    model.train()
    loss_fn = nn.BCEWithLogitsLoss(reduction="mean")
    total, count = 0.0, 0
    for x, y in loader:
        if len(y) == 0:  # Poisson sampling (DP-SGD) can draw an empty batch
            continue
        optimizer.zero_grad()
        loss = loss_fn(model(x).squeeze(-1), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> dict[str, float]:
    """Mean binary cross-entropy and accuracy of ``model`` on ``dataset``."""
    model.eval()
    x, y = dataset.tensors[0], dataset.tensors[1]
    logits = model(x).squeeze(-1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="mean")
    accuracy = ((logits > 0).float() == y).float().mean()
    return {"loss": float(loss), "accuracy": float(accuracy), "examples": float(len(y))}


def write_site_csv(path: str | Path, client_index: int, n_clients: int, seed: int, task: Task | None = None) -> Path:
    """Write site ``client_index``'s synthetic data as a CSV file in the task's schema."""
    chosen = task or globals()["task"]
    if chosen.synthetic_data is None:
        raise ValueError(f"task {chosen.name!r} has no synthetic data generator")
    dataset = chosen.synthetic_data(client_index, n_clients, seed)
    x, y = dataset.tensors[0].numpy(), dataset.tensors[1].numpy()
    out = Path(path)
    out.write_text(chosen.schema.to_csv(x, y))
    return out


task: Task = make_task()
mlp: Task = make_task(hidden=16)
