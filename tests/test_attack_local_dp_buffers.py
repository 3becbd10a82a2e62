"""Local DP covers only what DP-SGD trained: a server-chosen model must not release un-noised state.

Found by the adversarial review of 2026-12-07: the job's model held ``BatchNorm1d(affine=False)``,
which has no trainable parameter, so the layer check skipped it. In train mode its running mean and
variance are exact averages over the batch (no clipping, no noise) and they were federated with the
update: with the first layer the identity and the batch the whole data set, the update carried
0.1 × the mean of a feature, and changing one record moved the running variance from 0.029 to
199,994, while the site reported DP-SGD ε = 3.84. Now such a layer is refused for local DP like any
batch norm, and whatever else is not a DP-trained parameter (a float buffer a custom layer updates,
a frozen parameter) is sent back unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.clients.local_dp import LocalDpClient
from fedveil.clients.participation import only_dp_trained
from fedveil.clients.policy import SitePolicy
from fedveil.dp.compat import UnsupportedLayerError, check_dp_trainable
from fedveil.model_spec import ModelSpec
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, RecordingCoordinator, job_config, run_job, turnkey

NAMES = [f"site-{i}" for i in range(4)]


class RunningMean(nn.Module):
    """A custom layer no validator knows: it keeps an exact running mean of its inputs in a buffer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.seen.copy_(x.mean(dim=0))
        return x


def frozen_batch_norm() -> nn.Module:
    layer = nn.BatchNorm1d(4)
    layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm1d(4, affine=False), frozen_batch_norm])
def test_a_batch_norm_without_trainable_weights_is_refused_for_local_dp(norm: object) -> None:
    model = nn.Sequential(nn.Linear(4, 4), norm(), nn.Linear(4, 1))  # type: ignore[operator]
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d at 1"):
        check_dp_trainable(model)
    frozen_linear = nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 1))
    check_dp_trainable(frozen_linear)  # a frozen layer that treats each example alone is fine


def test_the_trainable_mask_names_parameters_not_buffers_or_frozen_weights() -> None:
    model = nn.Sequential(nn.Linear(2, 3), RunningMean(3), nn.Linear(3, 1))
    model[2].bias.requires_grad_(False)
    spec = ModelSpec.of(model)
    assert spec.names == ("0.weight", "0.bias", "1.seen", "2.weight", "2.bias")
    mask = spec.trainable_mask(model)
    assert mask.tolist() == [True] * 9 + [False] * 3 + [True] * 3 + [False]


def _local_dp_round(x: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One DP-SGD round as a site runs it; returns the released vector and the global one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), RunningMean(4), nn.Linear(4, 1))
    spec = ModelSpec.of(model)
    global_vector = spec.vector(model).copy()
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), 1)), batch_size=len(x))
    client = LocalDpClient(seed=seed)
    params = pb.LocalDpParams(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)
    m, opt, dl = client.privatize(params, model, torch.optim.SGD(model.parameters(), lr=1e-3), loader,
                                  local_epochs=1, policy=SitePolicy(authority_public_key=bytes(32)))
    for xb, yb in dl:
        opt.zero_grad()
        nn.functional.mse_loss(m(xb), yb).backward()
        opt.step()
    local = spec.vector(client.finish_round(m))
    return only_dp_trained(local, global_vector, spec.trainable_mask(m)), global_vector


def test_state_dp_sgd_did_not_train_leaves_unchanged() -> None:
    data = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    neighbour = data.clone()
    neighbour[0] = torch.tensor([1e4, 0.0, 0.0, 0.0])
    sent, global_vector = _local_dp_round(data, 11)
    sent_neighbour, _ = _local_dp_round(neighbour, 11)
    buffer = slice(20, 24)  # "1.seen", after the first layer's 16 + 4 values
    np.testing.assert_array_equal(sent[buffer], global_vector[buffer])
    np.testing.assert_array_equal(sent_neighbour[buffer], global_vector[buffer])
    assert not np.array_equal(sent[:20], global_vector[:20])  # the trained parameters did move


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_local_dp_job_never_releases_a_buffers_exact_statistics(tmp_path: Path) -> None:
    """The whole job: the model's running-mean buffer reaches the released aggregate unchanged (zero), while
    the trained weights move."""
    features = int(synthetic.metadata["n_features"])
    task = dataclasses.replace(synthetic, build_model=lambda: nn.Sequential(RunningMean(features),
                                                                           nn.Linear(features, 1)))
    consortium = Consortium.create(NAMES)
    holder: dict[str, RecordingCoordinator] = {}

    def front(coordinator: Coordinator) -> Coordinator:
        assert isinstance(coordinator, RecordingCoordinator)
        holder["c"] = coordinator
        return coordinator

    sites = [turnkey(task, name, i, consortium) for i, name in enumerate(NAMES)]
    config = job_config(rounds=1, dp="local", dp_local_noise_multiplier=1.2, min_clients=4, stage_timeout=20.0,
                        round_timeout=60.0)
    summary, _results, errors = run_job(tmp_path, config, task, sites, service=front,
                                        coordinator_cls=RecordingCoordinator)
    assert not errors and summary.completed_rounds == 1
    aggregate = np.asarray(holder["c"].applied[0].aggregate)
    assert np.all(aggregate[:features] == 0.0)  # "0.seen": the sites' exact feature means never left
    assert np.any(aggregate[features:] != 0.0)


def test_an_embedding_with_max_norm_is_refused_and_a_sites_own_engine_is_checked_too() -> None:
    """Review of 2026-12-07: Embedding(max_norm=...) rewrites the rows a batch looks up in place, outside
    autograd: rows the server set at norm 100 came back near 1 exactly where a record used them. And with a
    site's own PrivacyEngine the layer check was skipped, so a batch norm without weights got through."""
    from fedveil.clients.model_check import check_site_model

    with pytest.raises(UnsupportedLayerError, match=r"Embedding at 0.*max_norm"):
        check_dp_trainable(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 1)))
    check_dp_trainable(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1)))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))
    job = pb.JobInfo(dp_mode="local", model=ModelSpec.of(model).to_proto())
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d at 1"):
        check_site_model(job, model, own_privacy_engine=True)


def _loop(mistake: str) -> str:
    """One local-DP round as a site's loop runs it, with ``mistake``; returns why it may not be released."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=16, shuffle=True)  # one step an epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    client = LocalDpClient(seed=1)
    params = pb.LocalDpParams(target_epsilon=3.0, planned_rounds=5, max_grad_norm=1.0, delta=1e-5)
    policy = SitePolicy(authority_public_key=bytes(32))
    private, dp_optimizer, dp_loader = client.privatize(params, model, optimizer, loader, local_epochs=1,
                                                        policy=policy)

    def train(m: nn.Module, opt: torch.optim.Optimizer, batches: Any) -> None:
        for xb, yb in batches:
            if len(yb):
                opt.zero_grad()
                if mistake == "second_optimizer":
                    m.zero_grad()  # as a loop with its own optimizer does, clearing Opacus's per-sample grads
                nn.functional.mse_loss(m(xb).squeeze(-1), yb).backward()
                opt.step()

    if mistake in ("none", "fine_tune_after"):
        train(private, dp_optimizer, dp_loader)
    if mistake == "fine_tune_after":
        dp_optimizer.zero_grad()  # the DP epoch is done; then one plain epoch on the same data
    if mistake in ("ignored_returns", "fine_tune_after"):
        train(model, optimizer, loader)  # the loop's own optimizer: no clipping, no noise
    if mistake == "second_optimizer":
        train(private, torch.optim.SGD(private.parameters(), lr=0.1), dp_loader)
    if mistake in ("edited_weights", "edited_between_steps"):
        train(private, dp_optimizer, dp_loader)
        with torch.no_grad():
            model[0].bias.add_(1.0)
    if mistake == "edited_between_steps":  # then another noised step: the edit is no longer the last change
        train(private, dp_optimizer, dp_loader)
    return client.training_problem() or client.over_budget(policy)


@pytest.mark.parametrize("mistake", ["ignored_returns", "fine_tune_after", "second_optimizer", "edited_weights",
                                     "edited_between_steps"])
def test_training_outside_dp_sgd_is_never_released(mistake: str) -> None:
    """Review of 2026-12-07: a loop that trained with its own optimizer after rnd.privatize (or fine-tuned after
    the DP epoch, or stepped a second optimizer) released un-noised steps while the ledger recorded DP-SGD's ε
    alone, or no event at all. The site now declines such a round before anything leaves."""
    assert _loop("none") == ""
    reason = _loop(mistake)
    assert "outside DP-SGD" in reason or "after DP-SGD's last noised step" in reason, reason
