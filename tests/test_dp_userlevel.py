"""User-level DP (DP-FedAvg): clipping, central Gaussian noise, adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedveil.dp.accounting import RDPAccountant
from fedveil.dp.calibration import compute_epsilon
from fedveil.dp.central import (
    CentralGaussianMechanism,
    DPFedAvg,
    SecureNormalSampler,
    gaussian_rdp,
    make_generator,
)
from fedveil.dp.clipping import (
    AdaptiveClipper,
    AdaptiveClippingConfig,
    clip_update,
    clip_updates,
    update_noise_multiplier,
)


def test_the_seeded_sampler_repeats_only_for_its_seed_and_the_os_one_never() -> None:
    """--insecure-deterministic jobs draw central noise from an AES-CTR stream of the job's seed (so two
    runs agree bit for bit); every other job reads fresh OS entropy."""
    a, b = SecureNormalSampler(b"k" * 16), SecureNormalSampler(b"k" * 16)
    assert np.array_equal(a.standard_normal(1000), b.standard_normal(1000))
    assert not np.array_equal(SecureNormalSampler(b"j" * 16).standard_normal(1000),
                              SecureNormalSampler(b"k" * 16).standard_normal(1000))
    assert not np.array_equal(SecureNormalSampler().standard_normal(1000), SecureNormalSampler().standard_normal(1000))
    with pytest.raises(ValueError, match="insecure_seed"):
        SecureNormalSampler(b"short")


# --------------------------------------------------------------------------------------------
# Central noise calibration
# --------------------------------------------------------------------------------------------

FAIL_PROB = 1e-7  # two-sided false-failure probability of each statistical check


def variance_interval(count: int, sigma: float) -> tuple[float, float]:
    """Acceptance interval for the sample variance of ``count`` N(0, sigma^2) draws (chi-square)."""
    lo = stats.chi2.ppf(FAIL_PROB / 2, count - 1) / (count - 1)
    hi = stats.chi2.ppf(1 - FAIL_PROB / 2, count - 1) / (count - 1)
    return lo * sigma**2, hi * sigma**2


@pytest.mark.parametrize("source", ["pcg64", "csprng", "seeded"])
def test_central_noise_std_matches_calibration(source: str) -> None:
    clip, z, dim = 0.7, 1.3, 200_000
    mech = CentralGaussianMechanism(clip_norm=clip, noise_multiplier=z)
    assert mech.noise_stddev == pytest.approx(z * clip, rel=1e-15)
    rng = make_generator(1234) if source == "pcg64" else SecureNormalSampler(
        bytes(range(16)) if source == "seeded" else None)
    signal = np.linspace(-3.0, 3.0, dim)
    noised = mech.add_noise(signal, rng)
    noise = noised - signal
    lo, hi = variance_interval(dim, z * clip)
    assert lo <= float(np.var(noise, ddof=1)) <= hi
    # The check has power: a calibration off by 10% in either direction falls outside the interval.
    assert not lo <= (1.1 * z * clip) ** 2 <= hi
    assert not lo <= (0.9 * z * clip) ** 2 <= hi
    # Mean is zero: |mean| below the normal-approximation quantile.
    zq = stats.norm.ppf(1 - FAIL_PROB / 2)
    assert abs(float(np.mean(noise))) <= zq * z * clip / math.sqrt(dim)
    # Gaussian shape, not only the right variance (Kolmogorov–Smirnov on the standardized noise).
    assert stats.kstest(noise / (z * clip), "norm").pvalue > FAIL_PROB


def test_noise_is_reproducible_from_seed_and_differs_across_seeds() -> None:
    mech = CentralGaussianMechanism(1.0, 2.0)
    a = mech.add_noise(np.zeros(64), make_generator(7))
    b = mech.add_noise(np.zeros(64), make_generator(7))
    c = mech.add_noise(np.zeros(64), make_generator(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # OS-seeded generators are not reproducible.
    assert not np.array_equal(mech.add_noise(np.zeros(64), make_generator()), a)


def test_add_noise_accepts_torch_and_returns_torch() -> None:
    torch = pytest.importorskip("torch")
    mech = CentralGaussianMechanism(1.0, 0.5)
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = mech.add_noise(tensor, make_generator(3))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 3)
    expected = np.arange(6.0).reshape(2, 3) + 0.5 * make_generator(3).standard_normal((2, 3))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_noised_mean_divides_by_expected_cohort() -> None:
    mech = CentralGaussianMechanism(2.0, 1.0)
    total = np.full(10, 50.0)
    mean = mech.noised_mean(total, 25, make_generator(5))
    np.testing.assert_allclose(mean, (total + 2.0 * make_generator(5).standard_normal(10)) / 25)


def test_gaussian_rdp_curve() -> None:
    orders = np.array([1.5, 2.0, 10.0, 64.0])
    np.testing.assert_allclose(gaussian_rdp(2.0, orders), orders / 8.0)
    acc = dp_accounting.rdp.RdpAccountant(list(orders))
    acc.compose(dp_accounting.GaussianDpEvent(2.0))
    np.testing.assert_allclose(acc._rdp, gaussian_rdp(2.0, orders), rtol=1e-12)
    assert np.all(np.isinf(gaussian_rdp(0.0, orders)))


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(
    vector=hnp.arrays(np.float64, st.integers(1, 300), elements=finite),
    clip=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
@pytest.mark.slow
def test_clipping_bounds_hold(vector: np.ndarray, clip: float) -> None:
    result = clip_update(vector, clip)
    norm = float(np.linalg.norm(vector))
    assert float(np.linalg.norm(result.clipped)) <= clip
    assert result.norm == pytest.approx(norm, rel=1e-12, abs=0.0)
    if norm <= clip:
        np.testing.assert_array_equal(result.clipped, vector)  # unchanged, bit for bit
        assert result.unclipped == 1.0
    else:
        assert result.unclipped == 0.0
        # Scaled, not distorted: same direction, norm (essentially) exactly the bound.
        np.testing.assert_allclose(result.clipped, vector * (clip / norm), rtol=1e-9, atol=1e-300)
        assert float(np.linalg.norm(result.clipped)) == pytest.approx(clip, rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    batch=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 50)), elements=finite),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_batch_clipping_matches_row_by_row(batch: np.ndarray, clip: float) -> None:
    clipped, norms = clip_updates(batch, clip)
    assert np.all(np.linalg.norm(clipped, axis=1) <= clip)
    for row, out, norm in zip(batch, clipped, norms, strict=True):
        single = clip_update(row, clip)
        np.testing.assert_array_equal(single.clipped, out)
        assert single.norm == norm


def test_clip_update_keeps_shape_and_accepts_torch() -> None:
    torch = pytest.importorskip("torch")
    update = torch.ones(3, 4) * 2.0  # norm sqrt(48)
    result = clip_update(update, 1.0)
    assert result.clipped.shape == (3, 4)
    assert float(np.linalg.norm(result.clipped)) == pytest.approx(1.0)
    assert result.norm == pytest.approx(math.sqrt(48.0))


# --------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_clipping_converges_to_target_quantile(quantile: float) -> None:
    """Synthetic log-normal update norms: S approaches the γ-quantile of the norm distribution."""
    rng = make_generator(2021)
    m = 200
    config = AdaptiveClippingConfig(
        initial_clip_norm=0.05,  # far below the quantiles (about 0.6–1.7)
        noise_multiplier=1.0,
        expected_clients_per_round=m,
        target_quantile=quantile,
        learning_rate=0.2,
    )
    clipper = AdaptiveClipper(config)
    true_quantile = float(np.exp(stats.norm.ppf(quantile) * 0.5))  # lognormal(0, 0.5)
    history = []
    fractions = []
    for _ in range(400):
        norms = np.exp(rng.normal(0.0, 0.5, size=m))
        updates = norms[:, None] * np.array([[0.6, 0.8]])  # 2-D vectors with exactly these norms
        bits = np.array([clipper.clip(u).unclipped for u in updates])
        fractions.append(bits.mean())
        history.append(clipper.clip_norm)
        clipper.update(bits.sum(), rng, contributors=m)
    late = np.array(history[-150:])
    assert abs(float(np.median(late)) / true_quantile - 1.0) < 0.1
    assert abs(float(np.mean(fractions[-150:])) - quantile) < 0.04
    # It really moved: the starting point was a factor > 10 away.
    assert history[0] == pytest.approx(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("z", "sigma_b"), [(1.0, 5.0), (0.5, 0.26), (2.3, 10.0), (0.8, 0.41)])
def test_noise_split_formula_is_exact(z: float, sigma_b: float) -> None:
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    # The two Gaussian releases (updates: multiplier z_Δ; centred count b−1/2 with noise σ_b:
    # multiplier 2σ_b) compose to exactly one Gaussian with multiplier z: same ε under RDP and PLD.
    orders = [1.25, 1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0, 128.0]
    pair = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    for steps in (1, 100):
        split = dp_accounting.rdp.RdpAccountant(orders)
        split.compose(pair, steps)
        whole = dp_accounting.rdp.RdpAccountant(orders)
        whole.compose(dp_accounting.GaussianDpEvent(z), steps)
        assert split.get_epsilon(1e-5) == pytest.approx(whole.get_epsilon(1e-5), rel=1e-12)
    pld_split = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld_split.compose(pair, 10)
    pld_whole = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld_whole.compose(dp_accounting.GaussianDpEvent(z), 10)
    assert pld_split.get_epsilon(1e-5) == pytest.approx(pld_whole.get_epsilon(1e-5), rel=2e-3)


def test_adaptive_round_noise_and_update_rule() -> None:
    """The server adds N(0, (z_Δ S)^2) to the sum and moves S by exp(−η(b̃ − γ)) with b̃ noised by σ_b."""
    config = AdaptiveClippingConfig(initial_clip_norm=2.0, noise_multiplier=1.1, expected_clients_per_round=40)
    assert config.resolved_count_noise_stddev == 2.0  # m / 20
    dp = DPFedAvg.with_adaptive_clipping(config)
    dim = 100_000
    total = np.zeros(dim)
    out = dp.finish_round(total, make_generator(99), unclipped_count=30, contributors=40)
    z_delta = update_noise_multiplier(1.1, 2.0)
    assert out.noise_multiplier == 1.1 and out.clip_norm == 2.0
    assert out.noise_stddev == pytest.approx(z_delta * 2.0, rel=1e-15)
    lo, hi = variance_interval(dim, z_delta * 2.0)
    assert lo <= float(np.var(out.noised_mean * 40, ddof=1)) <= hi
    # Reproduce the update with the same generator stream: dim normals for the sum, then one for the count.
    replay = make_generator(99)
    replay.standard_normal(dim)
    fraction = (30 + 2.0 * float(replay.standard_normal(1)[0])) / 40
    assert out.next_clip_norm == pytest.approx(2.0 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    assert dp.clip_norm == out.next_clip_norm
    np.testing.assert_allclose(dp.rdp([2.0, 4.0]), np.array([2.0, 4.0]) / (2 * 1.1**2))


def test_noised_fraction_has_count_noise_stddev() -> None:
    config = AdaptiveClippingConfig(initial_clip_norm=1.0, noise_multiplier=1.0, expected_clients_per_round=100)
    clipper = AdaptiveClipper(config)
    rng = make_generator(4)
    draws = np.array([clipper.noised_unclipped_fraction(50, rng, 100) for _ in range(20_000)])
    lo, hi = variance_interval(draws.size, 5.0 / 100)
    assert lo <= float(np.var(draws, ddof=1)) <= hi


class _NoNoise:
    def standard_normal(self, size: int) -> np.ndarray:
        return np.zeros(size)


@pytest.mark.parametrize("m", [4, 40])
def test_the_released_fraction_moves_by_half_over_m_when_one_client_is_added(m: int) -> None:
    """The privacy review of 2026-12-07: the fraction was (Σ b_i + N) / m, which an added client with
    b = 1 moved by 1/m, twice the sensitivity Theorem 1's split of z assumes. From the centred sum,
    adding a client moves it by exactly ±1/(2m), whatever its bit, and the whitened sensitivity of the
    round's two releases is 1/z."""
    z, clip = 0.35, 1.0
    config = AdaptiveClippingConfig(initial_clip_norm=clip, noise_multiplier=z, expected_clients_per_round=m)
    clipper = AdaptiveClipper(config)
    base = clipper.noised_unclipped_fraction(5, _NoNoise(), 10)
    moves = [clipper.noised_unclipped_fraction(5 + bit, _NoNoise(), 11) - base for bit in (0, 1)]
    assert moves == pytest.approx([-1 / (2 * m), 1 / (2 * m)], abs=1e-15)
    # whitened: the update sum moves by ≤ S against noise z_Δ S, the fraction by 1/(2m) against σ_b / m
    count_move = max(abs(v) for v in moves) / (config.resolved_count_noise_stddev / m)
    assert math.hypot(1 / config.update_noise_multiplier, count_move) == pytest.approx(1 / z, rel=1e-12)
    with pytest.raises(ValueError, match="contributors must be at least the unclipped count"):
        clipper.noised_unclipped_fraction(5, _NoNoise(), 4)


def test_fixed_dpfedavg_round() -> None:
    dp = DPFedAvg.fixed(clip_norm=0.5, noise_multiplier=2.0, expected_clients_per_round=10)
    updates = make_generator(0).normal(size=(10, 8))
    clipped = np.stack([dp.clip(u).clipped for u in updates])
    assert np.all(np.linalg.norm(clipped, axis=1) <= 0.5)
    out = dp.finish_round(clipped.sum(axis=0), make_generator(1))
    np.testing.assert_allclose(out.noised_mean, (clipped.sum(axis=0) + 1.0 * make_generator(1).standard_normal(8)) / 10)
    assert out.next_clip_norm == out.clip_norm == 0.5


def test_dpfedavg_accounting_event_matches_the_accountant() -> None:
    dp = DPFedAvg.with_adaptive_clipping(AdaptiveClippingConfig(0.5, 1.3, 100))
    event = dp.dp_event(sample_rate=0.01, rounds=500)
    assert event.noise_multiplier == 1.3  # the accounted z, not the larger z_Δ
    accountant = RDPAccountant()
    accountant.compose(event)
    assert accountant.get_epsilon(1e-5) == pytest.approx(
        compute_epsilon(sample_rate=0.01, noise_multiplier=1.3, steps=500, delta=1e-5), rel=1e-12
    )


def test_adaptive_state_round_trip() -> None:
    config = AdaptiveClippingConfig(initial_clip_norm=1.0, noise_multiplier=1.0, expected_clients_per_round=100)
    clipper = AdaptiveClipper(config)
    clipper.update(10, make_generator(0), contributors=20)
    other = AdaptiveClipper(config)
    other.load_state_dict(clipper.state_dict())
    assert other.clip_norm == clipper.clip_norm != 1.0


# --------------------------------------------------------------------------------------------
# Bad parameters name the field at fault
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: CentralGaussianMechanism(clip_norm=0.0, noise_multiplier=1.0), "clip_norm"),
        (lambda: CentralGaussianMechanism(clip_norm=-1.0, noise_multiplier=1.0), "clip_norm"),
        (lambda: CentralGaussianMechanism(clip_norm=1.0, noise_multiplier=-0.1), "noise_multiplier"),
        (lambda: CentralGaussianMechanism(clip_norm=1.0, noise_multiplier=float("nan")), "noise_multiplier"),
        (lambda: clip_update(np.ones(3), 0.0), "clip_norm"),
        (lambda: clip_update(np.ones(3), -2.0), "clip_norm"),
        (lambda: clip_update(np.array([1.0, np.nan]), 1.0), "NaN"),
        (lambda: update_noise_multiplier(-1.0, 5.0), "noise_multiplier"),
        (lambda: update_noise_multiplier(1.0, 0.5), "count_noise_stddev"),
        (lambda: AdaptiveClippingConfig(0.0, 1.0, 10), "initial_clip_norm"),
        (lambda: AdaptiveClippingConfig(1.0, -1.0, 10), "noise_multiplier"),
        (lambda: AdaptiveClippingConfig(1.0, 1.0, 0), "expected_clients_per_round"),
        (lambda: AdaptiveClippingConfig(1.0, 1.0, 10, target_quantile=1.5), "target_quantile"),
        (lambda: AdaptiveClippingConfig(1.0, 1.0, 10, learning_rate=0.0), "learning_rate"),
        (lambda: AdaptiveClippingConfig(1.0, 4.0, 10, count_noise_stddev=1.0), "count_noise_stddev"),
        (lambda: DPFedAvg.fixed(1.0, 1.0, -3), "expected_clients"),
        (lambda: make_generator(-1), "seed"),
    ],
)
def test_bad_parameters_name_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()  # type: ignore[operator]


def test_adaptive_round_requires_unclipped_count() -> None:
    dp = DPFedAvg.with_adaptive_clipping(AdaptiveClippingConfig(1.0, 1.0, 40))
    with pytest.raises(ValueError, match="unclipped_count"):
        dp.finish_round(np.zeros(3), make_generator(0))
