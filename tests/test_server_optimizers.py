import json
import math

import numpy as np
import pytest
import torch

from fedveil.server.optimizers import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
    OptimizerConfigError,
    make_optimizer,
    optimizer_from_state,
    weighted_mean,
)


def test_fedavg_with_lr_one_gives_the_weighted_mean_of_client_models() -> None:
    rng = np.random.default_rng(0)
    w_global = rng.normal(size=7)
    client_models = [rng.normal(size=7) for _ in range(4)]
    weights = [10.0, 30.0, 5.0, 55.0]
    mean_update = weighted_mean([w - w_global for w in client_models], weights)
    new = FedAvg(lr=1.0).step(w_global, mean_update)
    expected = sum(wt * w for wt, w in zip(weights, client_models, strict=True)) / sum(weights)
    np.testing.assert_allclose(new, expected, rtol=1e-12, atol=1e-12)


def test_fedavg_server_learning_rate_scales_the_step() -> None:
    x = np.array([1.0, 2.0])
    assert FedAvg(lr=0.5).step(x, np.array([2.0, -4.0])).tolist() == [2.0, 0.0]


def test_fedadam_matches_a_hand_computed_step() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    x0 = np.array([0.5, -1.0, 2.0])
    d1 = np.array([0.2, -0.4, 0.0])
    d2 = np.array([-0.1, 0.3, 1.0])
    x1 = opt.step(x0, d1)
    # by hand, coordinate 0: m = 0.1*0.2 = 0.02; v = 0.99*1e-6 + 0.01*0.04 = 0.00040099
    m0, v0 = 0.02, 0.99 * 1e-6 + 0.01 * 0.04
    assert x1[0] == pytest.approx(0.5 + 0.1 * m0 / (math.sqrt(v0) + 1e-3), rel=1e-12)
    m = (1 - b1) * d1
    v = b2 * tau**2 + (1 - b2) * d1**2
    np.testing.assert_allclose(x1, x0 + lr * m / (np.sqrt(v) + tau), rtol=1e-12)
    x2 = opt.step(x1, d2)
    m = b1 * m + (1 - b1) * d2
    v = b2 * v + (1 - b2) * d2**2
    np.testing.assert_allclose(x2, x1 + lr * m / (np.sqrt(v) + tau), rtol=1e-12)


def test_yogi_and_adagrad_second_moments() -> None:
    d = np.array([0.5, -2.0])
    x = np.zeros(2)
    yogi = FedYogi(lr=1.0, beta1=0.0, beta2=0.9, tau=0.1)
    v = 0.01 - 0.1 * d**2 * np.sign(0.01 - d**2)
    np.testing.assert_allclose(yogi.step(x, d), d / (np.sqrt(v) + 0.1))
    ada = FedAdagrad(lr=1.0, beta1=0.0, tau=0.1)
    np.testing.assert_allclose(ada.step(x, d), d / (np.sqrt(0.01 + d**2) + 0.1))


def test_state_dicts_of_tensors_keep_keys_shapes_and_dtypes() -> None:
    params = {"w": torch.ones(2, 3), "b": torch.zeros(3), "count": torch.tensor(4)}
    update = {"w": torch.full((2, 3), 0.5), "b": torch.ones(3), "count": torch.tensor(0)}
    new = FedAvg(lr=2.0).step(params, update)
    assert list(new) == ["w", "b", "count"]
    assert torch.equal(new["w"], torch.full((2, 3), 2.0)) and new["w"].dtype == torch.float32
    assert torch.equal(new["b"], torch.full((3,), 2.0))
    assert int(new["count"]) == 4  # integer buffers are not optimised
    assert torch.equal(params["w"], torch.ones(2, 3))  # inputs untouched


def test_fedadam_resumes_exactly_from_its_state_dict() -> None:
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=5) for _ in range(4)]
    straight = FedAdam(lr=0.05)
    x = np.zeros(5)
    for d in deltas:
        x = straight.step(x, d)
    first = FedAdam(lr=0.05)
    y = np.zeros(5)
    for d in deltas[:2]:
        y = first.step(y, d)
    resumed = optimizer_from_state(json.loads(json.dumps(first.state_dict())))
    for d in deltas[2:]:
        y = resumed.step(y, d)
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (lambda: FedAvg(lr=0.0), "lr"),
        (lambda: FedAdam(beta1=1.0), "beta1"),
        (lambda: FedAdam(beta2=-0.1), "beta2"),
        (lambda: FedAdam(tau=0.0), "tau"),
        (lambda: make_optimizer("sgd"), "unknown server optimizer 'sgd'"),
    ],
)
def test_bad_hyper_parameters_are_named(factory: object, fragment: str) -> None:
    with pytest.raises(OptimizerConfigError, match=fragment):
        factory()  # type: ignore[operator]


def test_mismatched_shapes_and_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="same 1-D shape"):
        FedAvg().step(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        FedAvg().step(np.zeros(2), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="not all zero"):
        weighted_mean([np.zeros(2)], [0.0])
