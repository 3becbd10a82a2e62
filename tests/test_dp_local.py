"""LocalDPSession: Opacus DP-SGD across rounds with one accountant per client."""

from __future__ import annotations

import hashlib
import math

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant as OpacusRDP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.dp.accounting import DEFAULT_ORDERS, RDPAccountant, SubsampledGaussianEvent
from fedveil.dp.calibration import compute_epsilon
from fedveil.dp.ledger import BudgetExceededError
from fedveil.dp.local import LocalDPConfig, LocalDPSession, UnsupportedLayerError, make_dp_compatible
from fedveil.dp.secure_random import SecureRandom
from fedveil.dp.sgd_noise import SecureSgdNoise

torch.set_num_threads(1)
N, BATCH = 120, 12  # 10 Poisson batches per epoch: q = 0.1
DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")


def make_data(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def make_model(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 2)]
    return nn.Sequential(*layers)


def train_rounds(session: LocalDPSession, rounds: int, model: nn.Module | None = None) -> list[dict]:
    model = model if model is not None else make_model()
    loader = make_data()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    states = []
    for _ in range(rounds):
        m, opt, dl = session.privatize(model, optimizer, loader)
        for xb, yb in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()
        states.append(session.finish_round(m))
        model, optimizer = m._module, opt.original_optimizer
    return states


@pytest.mark.slow
def test_three_rounds_report_the_same_epsilon_as_direct_accounting() -> None:
    z = 1.3
    session = LocalDPSession(LocalDPConfig(max_grad_norm=1.0, noise_multiplier=z, seed=7))
    train_rounds(session, 3)
    steps = 3 * (N // BATCH)
    assert session.accountant.total_steps == steps
    assert session.round_events == [SubsampledGaussianEvent(0.1, z, N // BATCH)] * 3

    ours = session.epsilon(DELTA)
    direct = compute_epsilon(sample_rate=0.1, noise_multiplier=z, steps=steps, delta=DELTA)
    assert ours == pytest.approx(direct, rel=1e-9)
    # Opacus's own RDP accountant over the same orders, and Google's dp-accounting
    opacus = OpacusRDP()
    opacus.history = [(z, 0.1, steps)]
    assert ours == pytest.approx(opacus.get_epsilon(DELTA, alphas=list(DEFAULT_ORDERS)), rel=1e-9)
    google = dp_accounting.rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(z)), steps))
    assert ours == pytest.approx(google.get_epsilon(DELTA), rel=1e-3)


def test_state_dicts_are_plain_and_training_changes_the_model() -> None:
    session = LocalDPSession(LocalDPConfig(max_grad_norm=1.0, noise_multiplier=0.8, seed=1))
    initial = {k: v.clone() for k, v in make_model().state_dict().items()}
    states = train_rounds(session, 2)
    for state in states:
        assert set(state) == set(initial)  # no "_module." prefix
        assert not any(k.startswith("_module") for k in state)
    fresh = make_model(seed=99)
    fresh.load_state_dict(states[-1])
    assert any(not torch.equal(states[-1][k], initial[k]) for k in initial)
    # Opacus hooks are gone: a plain forward/backward on the trained model leaves no grad_sample behind
    model = make_model()
    train_rounds(LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=2)), 1, model=model)
    model(torch.randn(4, 6)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


@pytest.mark.slow
def test_seeded_sessions_are_deterministic() -> None:
    a = train_rounds(LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=5)), 2)
    b = train_rounds(LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=5)), 2)
    c = train_rounds(LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=6)), 2)
    assert all(torch.equal(a[-1][k], b[-1][k]) for k in a[-1])
    assert any(not torch.equal(a[-1][k], c[-1][k]) for k in a[-1])


def test_seeded_rounds_draw_fresh_noise() -> None:
    # Same start model in two rounds: the noise (and sampling) must differ, or rounds would repeat noise.
    session = LocalDPSession(LocalDPConfig(noise_multiplier=5.0, seed=11))
    states = [train_rounds(session, 1, model=make_model(seed=0))[0] for _ in range(2)]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_session_on_cuda() -> None:  # pragma: no cover - CPU-only CI
    session = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=3))
    model = make_model().cuda()
    loader = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, o, dl = session.privatize(model, opt, loader)
    for xb, yb in dl:
        o.zero_grad()
        nn.functional.cross_entropy(m(xb.cuda()), yb.cuda()).backward()
        o.step()
    state = session.finish_round(m)
    assert all(v.is_cuda for v in state.values())
    assert session.accountant.total_steps == N // BATCH


@pytest.mark.slow
def test_physical_batch_cap_keeps_logical_steps_and_epsilon() -> None:
    capped = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=3, max_physical_batch_size=4))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    m, opt, dl = capped.privatize(model, optimizer, make_data())
    sizes = []
    for xb, yb in dl:
        sizes.append(len(xb))
        opt.zero_grad()
        nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
    capped.finish_round(m)
    assert max(sizes) <= 4
    assert len(sizes) > N // BATCH  # logical batches really were split
    assert capped.accountant.total_steps == N // BATCH  # but only logical batches are noised steps
    uncapped = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=3))
    train_rounds(uncapped, 1)
    assert capped.epsilon() == uncapped.epsilon()


@pytest.mark.slow
def test_target_epsilon_plans_noise_once_and_stops_at_the_budget() -> None:
    target = 3.0
    session = LocalDPSession(LocalDPConfig(target_epsilon=target, planned_rounds=3, seed=4))
    train_rounds(session, 1)
    z = session.noise_multiplier
    assert z is not None
    train_rounds(session, 2)
    assert session.noise_multiplier == z  # not re-solved per round
    eps = session.epsilon()
    assert 0.99 * target <= eps <= target
    assert eps == pytest.approx(compute_epsilon(sample_rate=0.1, noise_multiplier=z, steps=30, delta=DELTA))
    with pytest.raises(BudgetExceededError) as info:
        train_rounds(session, 1)
    assert info.value.epsilon_before == pytest.approx(eps)
    assert session.accountant.total_steps == 30  # the refused round did not run


def test_unsupported_layers_are_fixed_with_a_warning_or_refused() -> None:
    session = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, seed=0))
    with pytest.warns(UserWarning, match="replaced unsupported layers.*BatchNorm"):
        states = train_rounds(session, 1, model=make_model(batchnorm=True))
    fixed = make_dp_compatible(make_model(batchnorm=True))
    fixed.load_state_dict(states[0])  # same architecture as the helper produces for the global model
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in fixed.modules())

    strict = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, fix_unsupported_layers=False))
    with pytest.raises(UnsupportedLayerError, match="BatchNorm"):
        train_rounds(strict, 1, model=make_model(batchnorm=True))


def test_round_protocol_misuse_is_refused() -> None:
    session = LocalDPSession(LocalDPConfig(noise_multiplier=1.0))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="without a privatize"):
        session.finish_round(model)
    m, _, _ = session.privatize(model, opt, make_data())
    with pytest.raises(RuntimeError, match="finish_round"):
        session.privatize(model, opt, make_data())
    with pytest.raises(ValueError, match="model returned by privatize"):
        session.finish_round(make_model())
    session.finish_round(m)
    assert session.epsilon() == 0.0  # no optimizer step was taken, nothing spent


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "exactly one"),
        ({"noise_multiplier": 1.0, "target_epsilon": 2.0, "planned_rounds": 2}, "exactly one"),
        ({"target_epsilon": 2.0}, "planned_rounds"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "accountant"),
        ({"noise_multiplier": 1.0, "max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"noise_multiplier": 1.0, "local_epochs": 0}, "local_epochs"),
        ({"noise_multiplier": 1.0, "secure_mode": True, "seed": 1}, "secure_mode"),
        ({"noise_multiplier": 1.0, "seed": 1.5}, "seed"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalDPConfig(**kwargs)


def test_secure_mode_needs_torchcsprng() -> None:
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchcsprng"):
            LocalDPSession(LocalDPConfig(noise_multiplier=1.0, secure_mode=True))
    else:  # pragma: no cover - only where torchcsprng is installed
        session = LocalDPSession(LocalDPConfig(noise_multiplier=1.0, secure_mode=True))
        train_rounds(session, 1)
        assert session.accountant.total_steps == N // BATCH


@pytest.mark.slow
def test_pld_session_accounts_with_pld() -> None:
    session = LocalDPSession(LocalDPConfig(noise_multiplier=1.1, accountant="pld", seed=0))
    train_rounds(session, 2)
    pld = compute_epsilon(sample_rate=0.1, noise_multiplier=1.1, steps=20, delta=DELTA, accountant="pld")
    assert session.epsilon() == pytest.approx(pld, rel=1e-9)
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.1, sample_rate=0.1, steps=20)
    assert session.epsilon() < rdp.get_epsilon(DELTA)
    assert math.isfinite(session.epsilon())


def _noise_only_steps(session: LocalDPSession, steps: int) -> list[torch.Tensor]:
    """Steps whose clipped gradients are all zero, so each step's gradient is its noise alone (undoing
    the batch scaling)."""
    model = nn.Sequential(nn.Linear(6, 500))
    m, opt, dl = session.privatize(model, torch.optim.SGD(model.parameters(), lr=0.0), make_data())
    noises = []
    for (xb, _yb), _ in zip(dl, range(steps), strict=False):
        opt.zero_grad()
        (m(xb) * 0.0).sum().backward()
        opt.step()
        noises.append(torch.cat([p.grad.flatten() for p in m.parameters()]) * opt.expected_batch_size)
    session.finish_round(m)
    return noises


@pytest.mark.parametrize("seed", [None, 4])
def test_the_noise_is_drawn_at_the_accounted_scale_fresh_every_step(seed: int | None) -> None:
    """The draws are N(0, (z·C)²), the scale the accountant counts; no two steps repeat; a seeded session
    reproduces its noise, an unseeded one never does."""
    z, clip = 2.0, 0.5
    config = LocalDPConfig(max_grad_norm=clip, noise_multiplier=z, seed=seed)
    noises = _noise_only_steps(LocalDPSession(config), 4)
    for noise in noises:
        assert noise.numel() == 3500 and float(noise.std()) == pytest.approx(z * clip, rel=0.06)
        assert abs(float(noise.mean())) < 0.1 * z * clip
    assert len({tuple(n[:8].tolist()) for n in noises}) == 4
    again = _noise_only_steps(LocalDPSession(config), 4)
    assert all(torch.equal(a, b) for a, b in zip(noises, again, strict=True)) == (seed is not None)


def test_the_noise_is_the_aes_ctr_stream_floating_point_safe() -> None:
    """Every noise value is four AES-CTR Gaussians summed and halved (Holohan & Braghin 2021, §5.1), drawn
    in parameter order from the round's key, not from torch's generator."""
    z, clip, seed = 2.0, 0.5, 9
    first = _noise_only_steps(LocalDPSession(LocalDPConfig(max_grad_norm=clip, noise_multiplier=z, seed=seed)), 1)[0]
    stream = SecureSgdNoise(hashlib.sha256(f"fedveil.dp.local|{seed}|noise|0".encode()).digest())
    weight, bias = stream.draw(z * clip, torch.zeros(500, 6)), stream.draw(z * clip, torch.zeros(500))
    torch.testing.assert_close(first, torch.cat([weight.flatten(), bias]), rtol=1e-5, atol=1e-6)
    four = SecureRandom(bytes(32)).standard_normal((4, 3))
    np.testing.assert_allclose(SecureSgdNoise(bytes(32)).draw(2.0, torch.zeros(3, dtype=torch.float64)).numpy(),
                               four.sum(axis=0))


def test_no_advice_to_retrain_with_opacus_secure_mode() -> None:
    """Opacus warns that its secure RNG is off and to retrain with it; the session draws its own noise
    (AES-CTR, floating-point safe), so a site's log does not carry that advice."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LocalDPSession(LocalDPConfig(noise_multiplier=1.0))
    assert not [w for w in caught if "Secure RNG" in str(w.message)]
