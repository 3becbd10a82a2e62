"""Which layers DP-SGD cannot train, where they sit, and the remedy (Opacus's validators, by layer path).

Opacus's ``ModuleValidator.validate`` returns a bag of errors without the layer's path, and its
``fix`` swaps layers (BatchNorm → GroupNorm, LSTM → DPLSTM) on a copy whose parameters have other
names and shapes. In a federation that swap must happen once, on the job's model, before the server
writes its model file: a site that swaps on its own sends an update the global model cannot take.
:func:`dp_layer_problems` names each offending layer by its path so the refusal can say exactly which
one and what to do (:func:`make_dp_compatible` on the job's model).
"""

from __future__ import annotations

from dataclasses import dataclass

from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedveil.errors import FedveilError

REMEDY = "build the job's model with fedveil.make_dp_compatible(model)"


class UnsupportedLayerError(FedveilError, ValueError):
    """The model contains layers DP-SGD cannot train (e.g. BatchNorm mixes examples in a batch)."""

    field = "model"


@dataclass(frozen=True)
class LayerProblem:
    """One layer DP-SGD cannot train: its path in the model (``features.1``), its class and Opacus's reason."""

    path: str
    layer: str
    reason: str

    def describe(self) -> str:
        return f"{self.layer} at {self.path or '(the model itself)'} is not trainable with DP-SGD ({self.reason})"


def dp_layer_problems(model: nn.Module) -> list[LayerProblem]:
    """Every trainable layer of ``model`` that Opacus refuses for DP-SGD, by path, in module order.

    The model's train/eval mode is not a layer problem (``model.train()`` fixes it) and is not reported.
    """
    problems = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            # max_norm renormalises the looked-up rows in place during forward, outside autograd: a row
            # the server set large comes back small exactly when a record used it (review of 2026-12-07)
            problems.append(LayerProblem(_plain_path(path), type(module).__name__,
                                         "max_norm rewrites the rows a batch looks up, outside DP-SGD's clipping "
                                         "and noise; build it without max_norm"))
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is None:
            continue
        # A frozen layer that treats each example alone is fine; a batch norm never is, trainable or not:
        # its output mixes the batch's examples (per-example clipping no longer bounds one example's
        # influence) and its running statistics are un-noised averages of the data (review of 2026-12-07).
        if not isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        for error in validator(module):
            problems.append(LayerProblem(_plain_path(path), type(module).__name__, _first_sentence(error)))
    return problems


def check_dp_trainable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer DP-SGD cannot train, with the remedy."""
    problems = dp_layer_problems(model)
    if problems:
        more = f" (and {len(problems) - 1} more layer(s))" if len(problems) > 1 else ""
        raise UnsupportedLayerError(f"{problems[0].describe()}{more}; {REMEDY}")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the layers DP-SGD cannot train replaced by Opacus's ``ModuleValidator.fix``
    (BatchNorm → GroupNorm, LSTM → DPLSTM, ...), in train mode. Raises :class:`UnsupportedLayerError`
    naming a layer that cannot be fixed."""
    fixed = ModuleValidator.fix(model)
    fixed.train()
    problems = dp_layer_problems(fixed)
    if problems:
        raise UnsupportedLayerError(
            "Opacus cannot fix this layer automatically: " + "; ".join(p.describe() for p in problems)
        )
    return fixed


def _plain_path(path: str) -> str:
    while path.startswith("_module."):
        path = path[len("_module."):]
    return "" if path == "_module" else path


def _first_sentence(error: UnsupportedModuleError | Exception) -> str:
    return str(error).strip().split(". ")[0].rstrip(".")
