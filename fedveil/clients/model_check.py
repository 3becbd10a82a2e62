"""A site's model against the job's, checked before any training (at Join and in ``rnd.privatize``).

Every check here runs before the first optimizer step, so a round that could not be submitted never
spends privacy budget: the job's model spec (names, shapes, dtypes, :class:`fedveil.model_spec.ModelSpec`)
must match the site's model by name, and under local DP every trainable layer must be one DP-SGD can
train. A BatchNorm or an ``nn.LSTM`` in a local-DP job is refused with its path and the remedy instead
of being swapped by Opacus at the site (which would make the site's update the wrong size).
"""

from __future__ import annotations

from torch import nn

from fedveil.model_spec import ModelSpec
from fedveil.protocol import fedveil_pb2 as pb


def job_spec(job: pb.JobInfo, model: nn.Module) -> ModelSpec:
    """The job's model spec as the server announced it (the site's own model's for a server that does not)."""
    return ModelSpec.from_proto(job.model) if len(job.model) else ModelSpec.of(model)


def check_trainable(model: nn.Module, spec: ModelSpec) -> None:
    """Raise if DP-SGD cannot train ``model`` (the layer and the remedy named) or it does not fit ``spec``."""
    from fedveil.dp.compat import check_dp_trainable

    check_dp_trainable(model)
    spec.check(model)


def check_site_model(job: pb.JobInfo, model: nn.Module, *, own_privacy_engine: bool) -> ModelSpec:
    """The job's spec, after checking the site's model against it (and, under local DP, that DP-SGD can
    train it, with the site's own ``PrivacyEngine`` as well). Raises
    :class:`~fedveil.model_spec.ModelMismatchError` or :class:`~fedveil.dp.compat.UnsupportedLayerError`."""
    spec = job_spec(job, model)
    if job.dp_mode == "local":  # a site's own engine too: Opacus checks trainable layers only (review of 2026-12-07)
        check_trainable(model, spec)
    else:
        spec.check(model)
    return spec
