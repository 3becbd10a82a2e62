"""The job's model by name (fedveil.model_spec): a site's model is checked against the job's spec and
weights move by name, never by position or total length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedveil.dp.compat import make_dp_compatible
from fedveil.model_spec import ModelMismatchError, ModelSpec
from fedveil.protocol import fedveil_pb2 as pb


class ConvFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1)  # 2*2*1*1 = 4 weights, 2 biases
        self.fc = nn.Linear(2, 2)        # 4 weights, 2 biases: same sizes as conv1, other shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv1(x).mean(dim=(2, 3)))


class FcFirst(ConvFirst):
    """The same layers registered in the other order: state_dict() lists fc before conv1."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.fc = nn.Linear(2, 2)
        self.conv1 = nn.Conv2d(2, 2, 1)


def test_layers_registered_in_another_order_receive_each_global_tensor_by_name() -> None:
    server_model, site_model = ConvFirst(), FcFirst()
    assert list(server_model.state_dict()) != list(site_model.state_dict())
    spec = ModelSpec.of(server_model)
    spec.check(site_model)  # same names, shapes and dtypes: it fits
    spec.load(spec.vector(server_model), site_model)
    for name, value in server_model.state_dict().items():
        assert torch.equal(site_model.state_dict()[name], value), name
    # the update goes back in the job's order, whatever the site's order
    assert np.array_equal(spec.vector(site_model), spec.vector(server_model))


def test_a_permuted_sequential_is_refused_naming_the_first_differing_parameter_and_both_shapes() -> None:
    job = ModelSpec.of(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4)))
    permuted = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))  # same total length (31 values)
    assert ModelSpec.of(permuted).size == job.size
    with pytest.raises(ModelMismatchError, match=r"0\.weight: the job's model has shape \(3, 4\), this site's "
                       r"model has shape \(4, 3\)") as refused:
        job.check(permuted)
    assert refused.value.field == "model"
    with pytest.raises(ModelMismatchError, match=r"0\.weight"):
        job.load(job.vector(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))), permuted)


def test_missing_and_extra_keys_are_named() -> None:
    job = ModelSpec.of(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1)))
    with pytest.raises(ModelMismatchError, match=r"1\.weight: the job's model has it \(shape \(1, 3\) float32\), "
                       r"this site's model has no such parameter"):
        job.check(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ModelMismatchError, match=r"2\.weight: this site's model has it \(shape \(1, 1\) float32\), "
                       r"the job's model has no such parameter"):
        job.check(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1), nn.Linear(1, 1)))
    with pytest.raises(ModelMismatchError, match=r"0\.bias: the job's model has it"):
        job.check(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 1)))


def test_a_dtype_difference_is_named() -> None:
    job = ModelSpec.of(nn.Linear(2, 1))
    with pytest.raises(ModelMismatchError, match=r"weight: the job's model has dtype float32, this site's model "
                       r"has dtype float64"):
        job.check(nn.Linear(2, 1).double())


def test_the_spec_travels_in_job_info_and_refuses_duplicate_names() -> None:
    spec = ModelSpec.of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    job = pb.JobInfo(model=spec.to_proto())  # type: ignore[arg-type]
    assert ModelSpec.from_proto(pb.JobInfo.FromString(job.SerializeToString()).model) == spec
    twice = [pb.TensorSpec(name="w", shape=[1]), pb.TensorSpec(name="w", shape=[1])]
    with pytest.raises(ModelMismatchError, match="names 'w' twice") as refused:
        ModelSpec.from_proto(twice)
    assert refused.value.field == "job.model"


def test_opacus_wrapper_prefix_and_dplstm_aliases_are_not_part_of_a_name() -> None:
    plain = make_dp_compatible(nn.Sequential(nn.LSTM(3, 4)))
    spec = ModelSpec.of(plain)
    # DPLSTM exposes each tensor under two names (an alias): the federation carries it once
    assert spec.size == sum(p.numel() for p in plain.parameters())
    wrapped = GradSampleModule(make_dp_compatible(nn.Sequential(nn.LSTM(3, 4))))
    assert all(k.startswith("_module.") for k in wrapped.state_dict())
    spec.check(wrapped)
    spec.load(spec.vector(plain), wrapped)
    assert np.array_equal(spec.vector(wrapped), spec.vector(plain))
    for name, value in plain.named_parameters():
        assert torch.equal(wrapped._module.get_parameter(name), value), name


def test_a_vector_of_the_wrong_length_is_refused() -> None:
    spec = ModelSpec.of(nn.Linear(2, 1))
    with pytest.raises(ModelMismatchError, match=r"the vector has shape \(4,\), the job's model needs \(3,\)"):
        spec.load(np.zeros(4, dtype=np.float32), nn.Linear(2, 1))
