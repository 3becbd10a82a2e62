"""The generic explanation of a prediction, for tasks that bring none of their own."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedveil.task import describe_margin, risk_level

Assessor = Callable[[torch.nn.Module, np.ndarray], dict[str, Any]]


def gradient_times_input(model: torch.nn.Module, features: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Generic explanation for a model with one logit: gradient × input per feature (first order)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(1, -1).requires_grad_(True)
    model.eval()
    logit = model(x).reshape(-1)[0]
    logit_value = float(logit.item())
    if not math.isfinite(logit_value):
        raise ValueError("the model's output is not finite for these values; check the measurements' units")
    (grad,) = torch.autograd.grad(logit, x)
    contrib = (grad * x).detach().numpy()[0].astype(np.float64)
    prob = float(torch.sigmoid(logit).item())
    order = np.argsort(-np.abs(contrib), kind="stable")
    return {
        "probability": prob,
        "logit": logit_value,
        "risk_level": risk_level(prob),
        "confidence": describe_margin(logit_value)
        + ". Contributions are first-order (gradient × input) approximations.",
        "top_features": [
            {
                "feature": names[i],
                "value": float(features[i]),
                "contribution": float(contrib[i]),
                "direction": "raises risk" if contrib[i] > 0 else "lowers risk",
            }
            for i in order[:5]
        ],
    }

