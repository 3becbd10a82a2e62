"""Fixed-point encoding into Z_2^k: exactness, error bound, unbiasedness, overflow rejection."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedveil.secagg import ConfigError, EncodingOverflowError, FixedPointEncoder, Ring

floats32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(8, 64),
    data=st.data(),
)
def test_ring_add_subtract_match_python_integers(bits, data):
    ring = Ring(bits)
    n = data.draw(st.integers(1, 20))
    a = [data.draw(st.integers(0, ring.modulus - 1)) for _ in range(n)]
    b = [data.draw(st.integers(0, ring.modulus - 1)) for _ in range(n)]
    acc = np.array(a, dtype=ring.dtype)
    ring.add(acc, np.array(b, dtype=ring.dtype))
    assert acc.tolist() == [(x + y) % ring.modulus for x, y in zip(a, b)]
    ring.subtract(acc, np.array(a, dtype=ring.dtype))
    ring.subtract(acc, np.array(a, dtype=ring.dtype))
    assert acc.tolist() == [(y - x) % ring.modulus for x, y in zip(a, b)]
    signed = ring.to_signed(acc)
    assert signed.tolist() == [v - ring.modulus if v >= ring.modulus // 2 else v for v in acc.tolist()]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50),
    clip=st.sampled_from([0.5, 1.0, 3.0, 100.0]),
    bits=st.sampled_from([24, 32, 48, 64]),
    data=st.data(),
)
def test_decoded_mean_within_error_bound(n, clip, bits, data):
    dim = data.draw(st.integers(1, 40))
    enc = FixedPointEncoder.for_clients(n, clip=clip, ring_bits=bits)
    xs = data.draw(hnp.arrays(np.float32, (n, dim), elements=floats32))
    ring = enc.ring
    total = ring.zeros(dim)
    for i in range(n):
        ring.add(total, enc.encode(xs[i], os.urandom(16)))
    mean = enc.decode_mean(total, n)
    clipped = np.clip(xs.astype(np.float64), -clip, clip).mean(axis=0)
    assert np.all(np.abs(mean - clipped) < enc.error_bound(n) + 1e-12 * clip)


def test_encoding_is_deterministic_given_the_seed_and_unbiased():
    enc = FixedPointEncoder(clip=1.0, frac_bits=2, ring_bits=32, max_clients=10)
    x = np.full(20_000, 0.1, dtype=np.float32)  # 0.1 * 4 = 0.4: rounds to 0 or 1 (quarters)
    seed = bytes(range(16))
    a, b = enc.encode(x, seed), enc.encode(x, seed)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, enc.encode(x, bytes(16)))
    decoded = enc.decode_sum(a)
    assert set(np.unique(decoded).tolist()) == {0.0, 0.25}
    # E[decoded] = 0.1 exactly; 20k samples: standard error 0.25 * sqrt(0.4*0.6/20000) ≈ 0.00087.
    assert abs(decoded.mean() - float(np.float32(0.1))) < 0.005


def test_negative_values_wrap_to_twos_complement():
    enc = FixedPointEncoder(clip=2.0, frac_bits=0, ring_bits=32, max_clients=2)
    out = enc.encode(np.array([-1.0, 1.0, -2.0, 5.0], np.float32), bytes(16))
    assert out.dtype == np.uint32
    assert out.tolist() == [2**32 - 1, 1, 2**32 - 2, 2]  # clipped to 2
    assert enc.decode_sum(out).tolist() == [-1.0, 1.0, -2.0, 2.0]


def test_small_ring_reduces_modulo_2k():
    enc = FixedPointEncoder(clip=1.0, frac_bits=4, ring_bits=12, max_clients=4)
    out = enc.encode(np.array([-1.0, 0.5], np.float32), bytes(16))
    assert out.tolist() == [(1 << 12) - 16, 8]
    assert enc.decode_sum(out).tolist() == [-1.0, 0.5]


def test_weighted_mean():
    enc = FixedPointEncoder.for_clients(3, clip=1.0, weighted=True, max_weight=100.0)
    xs = [np.array([0.5, -0.25], np.float32), np.array([-0.5, 0.75], np.float32), np.array([1.0, 1.0], np.float32)]
    ws = [10.0, 30.0, 60.0]
    total = enc.ring.zeros(3)
    for x, w in zip(xs, ws):
        v = enc.encode(x, os.urandom(16), weight=w)
        assert v.shape == (3,)
        enc.ring.add(total, v)
    mean, weight = enc.decode_weighted_mean(total)
    expected = sum(w * x.astype(np.float64) for x, w in zip(xs, ws)) / 100.0
    assert weight == pytest.approx(100.0, abs=3 / enc.scale)
    assert np.allclose(mean, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="weight"):
        enc.encode(xs[0], os.urandom(16))
    with pytest.raises(ConfigError, match="weight"):
        enc.encode(xs[0], os.urandom(16), weight=101.0)


def test_overflowing_configuration_rejected_with_parameters_named():
    with pytest.raises(EncodingOverflowError) as err:
        FixedPointEncoder(clip=1.0, frac_bits=24, ring_bits=32, max_clients=200)
    text = str(err.value)
    for name in ("max_clients=200", "clip=1.0", "frac_bits=24", "ring_bits"):
        assert name in text
    # The boundary: n * clip * 2^f must stay below 2^(k-1).
    FixedPointEncoder(clip=1.0, frac_bits=23, ring_bits=32, max_clients=255)
    with pytest.raises(EncodingOverflowError):
        FixedPointEncoder(clip=1.0, frac_bits=23, ring_bits=32, max_clients=256)
    with pytest.raises(EncodingOverflowError):
        FixedPointEncoder.for_clients(10, clip=1e12, ring_bits=16)


def test_for_clients_picks_largest_safe_precision():
    enc = FixedPointEncoder.for_clients(500, clip=1.0, ring_bits=32)
    assert enc.frac_bits == 22
    assert 500 * enc.max_abs_encoded < 2**31
    assert 500 * 2 * enc.max_abs_encoded >= 2**31  # one more bit would overflow


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected(bad):
    enc = FixedPointEncoder.for_clients(3, clip=1.0)
    with pytest.raises(ConfigError, match="NaN or infinity"):
        enc.encode(np.array([0.0, bad], np.float32), bytes(16))


def test_invalid_parameters_named():
    with pytest.raises(ConfigError, match="clip"):
        FixedPointEncoder(clip=0.0, frac_bits=8, ring_bits=32, max_clients=2)
    with pytest.raises(ConfigError, match="ring_bits"):
        FixedPointEncoder(clip=1.0, frac_bits=8, ring_bits=65, max_clients=2)
    with pytest.raises(ConfigError, match="seed"):
        FixedPointEncoder.for_clients(2, 1.0).encode(np.zeros(3, np.float32), b"short")
    with pytest.raises(ConfigError, match="dtype"):
        Ring(32).check(np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match="2\\^12"):
        Ring(12).check(np.array([5000], np.uint32))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    clip=st.sampled_from([0.25, 1.0, 3.0, 100.0]),
    bits=st.sampled_from([16, 24, 32, 40, 64]),
    weight=st.sampled_from([None, 0.5, 1.0, 7.0, 1000.0]),
)
def test_extreme_inputs_at_the_accepted_boundary_never_wrap(n, clip, bits, weight):
    """The overflow rule, end to end: with the most precise encoder accepted for n clients,
    n clients all at +clip (or -clip) with the largest weight decode to the true sums; one more
    fractional bit is rejected as an overflow (unless the precision cap binds first)."""
    weighted = weight is not None
    try:
        enc = FixedPointEncoder.for_clients(n, clip=clip, ring_bits=bits, weighted=weighted,
                                            max_weight=weight if weighted else 1.0)
    except EncodingOverflowError:
        assume(False)
    x = np.array([clip, -clip, 0.0], np.float32)
    one = enc.encode(x, bytes(16), weight=weight)  # ±clip·w·scale are integers: encoded exactly
    # The ring sum of n such encodings, computed exactly with Python integers.
    total = np.array([(int(v) * n) % enc.ring.modulus for v in one], dtype=enc.ring.dtype)
    decoded = enc.decode_sum(total)
    w = weight if weighted else 1.0
    assert decoded[0] == pytest.approx(n * clip * w, abs=n / enc.scale)
    assert decoded[1] == pytest.approx(-n * clip * w, abs=n / enc.scale)
    assert decoded[2] == pytest.approx(0.0, abs=n / enc.scale)
    if weighted:
        assert decoded[3] == pytest.approx(n * w, abs=n / enc.scale)
    if enc.frac_bits < 40 and enc.max_abs_encoded * 2 <= 1 << 40:
        with pytest.raises(EncodingOverflowError):
            FixedPointEncoder(clip, enc.frac_bits + 1, bits, n, weighted, weight if weighted else 1.0)
