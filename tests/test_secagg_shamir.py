"""Vectorized Shamir sharing over GF(2^31 - 1) and AES-GCM share boxes."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import ConfigError, ShareDecryptionError, shamir
from fedveil.secagg.shamir import (
    PRIME,
    bytes_to_limbs,
    lagrange_at_zero,
    limbs_to_bytes,
    open_share,
    random_field_elements,
    reconstruct,
    seal_share,
    share,
)


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0),
    holders=st.integers(1, 30),
    data=st.data(),
)
def test_any_t_shares_reconstruct(secret, holders, data):
    t = data.draw(st.integers(1, holders))
    ids = data.draw(st.lists(st.integers(0, 10_000), min_size=holders, max_size=holders, unique=True))
    xs = np.array(ids, dtype=np.int64) + 1
    limbs = bytes_to_limbs(secret)
    shares = share(limbs, xs, t)
    assert shares.shape == (holders, limbs.size)
    assert shares.min() >= 0 and shares.max() < PRIME
    pick = data.draw(st.lists(st.integers(0, holders - 1), min_size=t, max_size=t, unique=True))
    out = reconstruct(xs[pick], shares[pick])
    assert limbs_to_bytes(out) == secret


def _reference_shares(secrets: list[int], xs: list[int], threshold: int, seed: bytes) -> list[list[int]]:
    """f(x) = s + a_1 x + ... + a_{t-1} x^{t-1} mod p with Python integers, from the same seeded coefficients."""
    coeffs = random_field_elements((threshold - 1) * len(secrets), seed).reshape(threshold - 1, len(secrets))
    return [[(s + sum(int(coeffs[d, j]) * pow(x, d + 1, PRIME) for d in range(threshold - 1))) % PRIME
             for j, s in enumerate(secrets)] for x in xs]


@settings(max_examples=40, deadline=None)
@given(
    secrets=st.lists(st.integers(0, PRIME - 1), min_size=1, max_size=6),
    xs=st.lists(st.integers(1, PRIME - 1), min_size=1, max_size=40, unique=True),
    data=st.data(),
    chunk=st.sampled_from([None, 1, 3]),
)
def test_shares_are_the_polynomial_evaluated_exactly(secrets, xs, data, chunk):
    """The float64 matrix product gives the exact field values, for points and secrets up to p − 1
    (the extremes where a rounding would show), also when the sum is split into chunks."""
    threshold = data.draw(st.integers(1, len(xs)))
    seed = data.draw(st.binary(min_size=16, max_size=16))
    default = shamir._MAX_TERMS
    shamir._MAX_TERMS = chunk or default
    try:
        got = share(np.array(secrets, dtype=np.int64), np.array(xs, dtype=np.int64), threshold, seed=seed)
    finally:
        shamir._MAX_TERMS = default
    assert got.tolist() == _reference_shares(secrets, xs, threshold, seed)


def test_shares_at_the_largest_points_and_coefficients_are_exact():
    """Every coefficient p − 1 and points near p: each 16-bit half is at its maximum."""
    xs = [PRIME - 1, PRIME - 2, PRIME - 3, 65535, 65536]
    secrets = np.full(3, PRIME - 1, dtype=np.int64)
    threshold = 5

    def all_max(count: int, seed: bytes | None = None) -> np.ndarray:
        return np.full(count, PRIME - 1, dtype=np.int64)

    original = shamir.random_field_elements
    shamir.random_field_elements = all_max
    try:
        got = share(secrets, np.array(xs, dtype=np.int64), threshold)
    finally:
        shamir.random_field_elements = original
    want = [[(PRIME - 1) * sum(pow(x, d, PRIME) for d in range(threshold)) % PRIME] * 3 for x in xs]
    assert got.tolist() == want


def test_fewer_than_t_shares_reveal_nothing_about_the_secret():
    """With t-1 shares every secret is equally consistent: interpolating t-1 points of two
    different secrets' sharings gives independent, uniform-looking values, never the secret."""
    xs = np.arange(1, 8, dtype=np.int64)
    secret = bytes_to_limbs(os.urandom(32))
    hits = 0
    for _ in range(50):
        shares = share(secret, xs, 4)
        partial = reconstruct(xs[:3], shares[:3])
        hits += int(np.array_equal(partial, secret))
    assert hits == 0
    # Marginals of a single share are uniform over the field: chi-square over 16 buckets.
    many = np.concatenate([share(secret, xs, 4)[0] for _ in range(400)])
    counts = np.bincount((many * 16 // PRIME).astype(np.int64), minlength=16)
    expected = many.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 40  # chi2(15) 0.999 quantile ≈ 37.7


def test_deterministic_coefficients_from_seed_and_exact_uniform_range():
    seed = os.urandom(16)
    a = random_field_elements(1000, seed)
    assert np.array_equal(a, random_field_elements(1000, seed))
    assert a.min() >= 0 and a.max() < PRIME
    xs = np.arange(1, 6)
    s = bytes_to_limbs(b"abcd")
    assert np.array_equal(share(s, xs, 3, seed), share(s, xs, 3, seed))
    assert not np.array_equal(share(s, xs, 3, seed), share(s, xs, 3, os.urandom(16)))


def test_lagrange_coefficients_sum_to_one():
    for t in (1, 2, 5, 40):
        xs = np.arange(3, 3 + t, dtype=np.int64)
        assert int(lagrange_at_zero(xs).sum() % PRIME) == 1  # interpolating the constant 1


def test_all_subsets_small_case():
    xs = np.array([2, 5, 9, 11], dtype=np.int64)
    secret = bytes_to_limbs(b"\x01\x02\xff\xfe")
    shares = share(secret, xs, 2)
    for pair in itertools.combinations(range(4), 2):
        assert np.array_equal(reconstruct(xs[list(pair)], shares[list(pair)]), secret)


def test_invalid_sharing_parameters():
    with pytest.raises(ConfigError, match="threshold"):
        share(np.array([1]), np.array([1, 2]), 3)
    with pytest.raises(ConfigError, match="distinct"):
        share(np.array([1]), np.array([1, 1]), 2)
    with pytest.raises(ConfigError, match="distinct"):
        share(np.array([1]), np.array([0, 1]), 2)


def test_share_box_roundtrip_and_tamper_detection():
    key = os.urandom(16)
    session = os.urandom(32)
    plain = os.urandom(96)
    box = seal_share(key, plain, 3, 7, session)
    assert open_share(key, box, 3, 7, session) == plain
    for i in range(len(box)):
        bad = bytearray(box)
        bad[i] ^= 0x80
        with pytest.raises(ShareDecryptionError):
            open_share(key, bytes(bad), 3, 7, session)
    with pytest.raises(ShareDecryptionError):
        open_share(key, box, 4, 7, session)  # wrong sender
    with pytest.raises(ShareDecryptionError):
        open_share(key, box, 3, 8, session)  # wrong recipient
    with pytest.raises(ShareDecryptionError):
        open_share(key, box, 3, 7, os.urandom(32))  # another session
    with pytest.raises(ShareDecryptionError):
        open_share(os.urandom(16), box, 3, 7, session)


def _lagrange_reference(xs: list[int]) -> list[int]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % PRIME, den * (xj - xi) % PRIME
        out.append(num * pow(den, PRIME - 2, PRIME) % PRIME)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, PRIME - 1), min_size=1, max_size=80, unique=True))
def test_lagrange_coefficients_equal_the_integer_reference(xs):
    """λ_i = P / (x_i · D_i) gives the textbook Π x_j / (x_j − x_i), for points anywhere in the field."""
    assert lagrange_at_zero(np.asarray(xs, dtype=np.int64)).tolist() == _lagrange_reference(xs)


def test_lagrange_rejects_repeated_zero_and_misshapen_points():
    with pytest.raises(ConfigError, match="distinct and non-zero"):
        lagrange_at_zero(np.array([3, 5, 3]))
    with pytest.raises(ConfigError, match="distinct and non-zero"):
        lagrange_at_zero(np.array([PRIME, 4]))  # PRIME ≡ 0
    with pytest.raises(ConfigError, match="one row of points"):
        lagrange_at_zero(np.array([[1, 2], [3, 4]]))
