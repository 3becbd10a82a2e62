"""The AES-CTR generator behind every DP noise draw: determinism by key, distributions, and that the
sites' distributed-DP noise really comes from it (not from numpy's PCG64)."""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np
import pytest
from scipy import special, stats

from fedveil.clients.distributed import distributed_noise_source, prepare_distributed_update
from fedveil.dp.central import SecureNormalSampler, make_generator
from fedveil.dp.distributed import derive_parameters, encode_update
from fedveil.dp.secure_random import SecureRandom, _log_poisson_ratio
from fedveil.protocol import fedveil_pb2 as pb

FAIL_PROB = 1e-6
KEY = bytes(range(32))


def chi_square_pvalue(samples: np.ndarray, pmf_of: object, last: int) -> float:
    """Goodness of fit on {0, …, last − 1} plus one tail bin (``pmf_of`` is a scipy frozen distribution)."""
    counts = np.bincount(np.minimum(samples, last), minlength=last + 1).astype(np.float64)
    pmf = pmf_of.pmf(np.arange(last))  # type: ignore[attr-defined]
    expected = np.concatenate((pmf, [max(0.0, 1.0 - pmf.sum())])) * samples.size
    keep = expected > 5.0  # merge sparse bins into the tail so the test stays valid
    counts = np.concatenate((counts[keep], [counts[~keep].sum()]))
    expected = np.concatenate((expected[keep], [expected[~keep].sum()]))
    if expected[-1] == 0.0:
        counts, expected = counts[:-1], expected[:-1]
    return float(stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue)


def test_the_same_key_gives_the_same_draws_and_another_key_others() -> None:
    a, b, c = SecureRandom(KEY), SecureRandom(KEY), SecureRandom(bytes(32))
    first = (a.random(100), a.poisson(3.0, 50), a.geometric(0.2, 50), a.standard_normal(10), a.poisson(1e6, 50))
    second = (b.random(100), b.poisson(3.0, 50), b.geometric(0.2, 50), b.standard_normal(10), b.poisson(1e6, 50))
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(c.random(100), first[0])
    assert not np.array_equal(a.random(100), first[0])  # the stream moves on


def test_the_key_is_checked_and_never_shown() -> None:
    with pytest.raises(ValueError, match="key: expected 16 or 32 bytes"):
        SecureRandom(bytes(24))
    with pytest.raises(ValueError, match="key: expected bytes"):
        SecureRandom("k" * 32)  # type: ignore[arg-type]
    assert KEY.hex() not in repr(SecureRandom(KEY)) and "secret" in repr(SecureRandom(KEY))


def test_the_draws_are_the_aes_ctr_keystream() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(KEY), modes.CTR(bytes(16))).encryptor().update(bytes(80))
    words = np.frombuffer(stream, dtype="<u8")
    np.testing.assert_array_equal(SecureRandom(KEY).random(10), (words >> np.uint64(11)) * 2.0**-53)


def test_uniforms_and_normals() -> None:
    rng = SecureRandom(KEY)
    u = rng.random((300, 1000))
    assert u.shape == (300, 1000) and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel()[:100_000], "uniform").pvalue > FAIL_PROB
    z = rng.standard_normal(200_000)
    assert stats.kstest(z, "norm").pvalue > FAIL_PROB
    assert rng.standard_normal().shape == () and rng.standard_normal((2, 3)).shape == (2, 3)


@pytest.mark.parametrize("mean", [0.05, 0.7, 3.0, 9.99, 10.0, 37.5, 1e4])
def test_poisson_matches_its_pmf(mean: float) -> None:
    samples = SecureRandom(KEY).poisson(mean, 2_000_000)  # enough to see a proposal off by half a step
    assert samples.dtype == np.int64 and samples.min() >= 0
    last = int(stats.poisson.ppf(1 - 1e-6, mean)) + 1
    assert chi_square_pvalue(samples, stats.poisson(mean), last) > FAIL_PROB


@pytest.mark.parametrize("mean", [1e9, 1e12, 2.0**40])
def test_poisson_keeps_its_mean_and_variance_for_huge_means(mean: float) -> None:
    """Where ``k log λ − log k!`` cancels in float64, the Stirling form keeps the acceptance exact."""
    samples = SecureRandom(KEY).poisson(mean, 200_000).astype(np.float64)
    z_mean = (samples.mean() - mean) / math.sqrt(mean / samples.size)
    assert abs(z_mean) < 5.0
    assert abs(samples.var() / mean - 1.0) < 5.0 * math.sqrt(2.0 / samples.size)


def test_the_stirling_form_of_the_acceptance_test_is_the_direct_one() -> None:
    mean = 57.0
    k = np.array([0.0, 3.0, 14.0, 15.0, 16.0, 40.0, 57.0, 90.0, 1e3, 1e5])
    direct = -mean + k * math.log(mean) - special.gammaln(k + 1.0)
    np.testing.assert_allclose(_log_poisson_ratio(k, mean, math.log(mean)), direct, rtol=1e-11, atol=1e-9)


@pytest.mark.parametrize("p", [1e-3, 0.05, 0.3, 0.632])
def test_geometric_matches_its_pmf(p: float) -> None:
    samples = SecureRandom(KEY).geometric(p, 300_000)
    assert samples.min() >= 1
    last = int(stats.geom.ppf(1 - 1e-6, p)) + 1
    assert chi_square_pvalue(samples, stats.geom(p), last) > FAIL_PROB


@pytest.mark.parametrize(("call", "match"), [
    (lambda r: r.poisson(-1.0, 3), "lam"),
    (lambda r: r.poisson(math.nan, 3), "lam"),
    (lambda r: r.poisson(2.0**40 * 1.01, 3), "lam"),
    (lambda r: r.geometric(0.0, 3), "p must"),
    (lambda r: r.geometric(1.5, 3), "p must"),
    (lambda r: r.random((2, -1)), "size"),
])
def test_bad_parameters_are_named(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(SecureRandom(KEY))  # type: ignore[operator]


def test_edge_parameters() -> None:
    rng = SecureRandom(KEY)
    np.testing.assert_array_equal(rng.poisson(0.0, 4), np.zeros(4, dtype=np.int64))
    np.testing.assert_array_equal(rng.geometric(1.0, (2, 2)), np.ones((2, 2), dtype=np.int64))
    assert rng.poisson(5.0, 0).shape == (0,)


def test_the_server_sampler_halves_four_of_this_generators_normals() -> None:
    """The privacy review of 2026-12-07: one Box–Muller draw is bounded at 8.57 (u1 ≥ 2⁻⁵³), an infinite
    privacy loss near the edge with probability past δ at z ≤ 0.2; the central noise is now the halved
    sum of four, exactly N(0, 1) and bounded at 17.1."""
    seed = bytes(range(16))
    four = SecureRandom(seed).standard_normal((4, 20))
    np.testing.assert_array_equal(SecureNormalSampler(seed).standard_normal(20), four.sum(axis=0) * 0.5)
    assert SecureNormalSampler(seed).standard_normal((2, 3)).shape == (2, 3)
    assert SecureNormalSampler(seed).standard_normal().shape == ()
    bound = math.sqrt(-2.0 * math.log(2.0**-53))
    assert bound == pytest.approx(8.5717, abs=1e-4) and 2 * bound == pytest.approx(17.143, abs=1e-3)
    z = SecureNormalSampler(seed).standard_normal(400_000)
    assert stats.kstest(z, "norm").pvalue > FAIL_PROB and abs(float(np.var(z)) - 1.0) < 0.01
    assert not np.array_equal(SecureNormalSampler().standard_normal(20), SecureNormalSampler().standard_normal(20))
    with pytest.raises(ValueError, match="insecure_seed"):
        SecureNormalSampler(bytes(8))


def _distributed_start(dim: int, mechanism: str) -> tuple[pb.RoundStart, object, int]:
    config = derive_parameters(8, dim, 1.0, mechanism=mechanism, bits=20, noise_multiplier=1.0)
    rotation = 0x1234_5678
    start = pb.RoundStart()
    start.encoding.CopyFrom(pb.EncodingParams(ring_bits=config.bits, dimension=config.padded_dim))
    start.dp.CopyFrom(pb.DpParams(mode="distributed", update_clip_norm=1.0))
    start.dp.distributed.CopyFrom(pb.DistributedDpParams(
        mechanism=config.mechanism, l2_clip=config.clip_norm, scale=config.scale, noise_stddev=config.local_stddev,
        beta=config.beta, bits=config.bits, rotation_seed=struct.pack("<Q", rotation),
        padded_dimension=config.padded_dim, config_json=json.dumps(dataclasses.asdict(config), sort_keys=True)))
    return start, config, rotation


@pytest.mark.parametrize("mechanism", ["skellam", "ddg"])
def test_a_sites_noise_share_comes_from_its_aes_ctr_stream(mechanism: str) -> None:
    """The site's rounding and noise are the AES-CTR stream keyed by its attempt's seeds, not PCG64."""
    start, config, rotation = _distributed_start(200, mechanism)
    delta = make_generator(3).normal(size=200) / 40
    noise_seed, rounding_seed = bytes(range(32)), bytes(range(100, 116))
    prepared = prepare_distributed_update(delta, start, rounding_seed=rounding_seed, noise_seed=noise_seed)
    expected = encode_update(config, delta, rotation_seed=rotation,  # type: ignore[arg-type]
                             rng=distributed_noise_source(noise_seed, rounding_seed), ring_bits=20)
    np.testing.assert_array_equal(prepared.ring_vector, expected)
    # numpy's generator under the same seeds (the code before) draws other noise
    pcg = np.random.default_rng(np.frombuffer(noise_seed + rounding_seed, dtype=np.uint32))
    assert not np.array_equal(
        prepared.ring_vector, encode_update(config, delta, rotation_seed=rotation, rng=pcg, ring_bits=20))  # type: ignore[arg-type]
    # another attempt's seed, another noise share
    other = prepare_distributed_update(delta, start, rounding_seed=rounding_seed, noise_seed=bytes(32))
    assert not np.array_equal(prepared.ring_vector, other.ring_vector)


@pytest.mark.parametrize("mechanism", ["skellam", "ddg"])
def test_noise_at_the_cap_reaches_every_residue(mechanism: str) -> None:
    """The review's lattice: at a Poisson mean of 5.6e17 every Skellam draw was a multiple of 32, so the sum's
    low bits carried the update untouched. At the largest noise a config allows, the draws' differences have
    no common factor and the low five bits are uniform."""
    from fedveil.dp.discrete_noise import MAX_LOCAL_STDDEV, sample_discrete_gaussian, sample_skellam

    rng = SecureRandom(KEY)
    draws = (sample_skellam(rng, MAX_LOCAL_STDDEV**2, 40_000) if mechanism == "skellam"
             else sample_discrete_gaussian(rng, MAX_LOCAL_STDDEV, 40_000))
    assert int(np.gcd.reduce(np.abs(draws - draws[0]))) == 1
    residues = np.bincount(draws % 32, minlength=32)
    assert stats.chisquare(residues).pvalue > FAIL_PROB
    with pytest.raises(ValueError, match="too large"):
        sample_skellam(rng, (MAX_LOCAL_STDDEV * 1.01) ** 2, 3)
    with pytest.raises(ValueError, match="too large"):
        sample_discrete_gaussian(rng, MAX_LOCAL_STDDEV * 1.01, 3)


def test_a_config_whose_noise_cannot_be_sampled_exactly_is_refused() -> None:
    with pytest.raises(ValueError, match=r"local_stddev .* above 2\^20"):
        derive_parameters(8, 1000, 1.0, mechanism="skellam", bits=34, noise_multiplier=6.0)
