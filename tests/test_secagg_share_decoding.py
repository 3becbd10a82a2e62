"""Error-correcting share reconstruction (Berlekamp–Welch): wrong shares from up to ⌊(N − t)/2⌋
holders are located and left out, more are refused, and a faulty holder cannot sink a round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import SecAggConfig
from fedveil.secagg.messages import UnmaskingResponse
from fedveil.secagg.shamir import PRIME, random_field_elements, share
from fedveil.secagg.share_decoding import (
    UndecodableSharesError,
    decode_shares,
    fold_limbs,
    locate_faulty,
    on_one_polynomial,
    parity_weights,
)
from tests.secagg_helpers import ManualRound, ring_sum


@st.composite
def shared_secrets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    t = draw(st.integers(1, 12))
    n = draw(st.integers(t, t + 14))
    limbs = draw(st.integers(1, 18))
    secret = np.asarray(draw(st.lists(st.integers(0, PRIME - 1), min_size=limbs, max_size=limbs)), dtype=np.int64)
    xs = np.asarray(sorted(draw(st.sets(st.integers(1, 10**6), min_size=n, max_size=n))), dtype=np.int64)
    return secret, xs, share(secret, xs, t), t


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(shared_secrets(), st.data())
def test_up_to_half_the_spare_shares_wrong_are_located_and_the_secret_is_exact(case, data) -> None:
    secret, xs, shares, t = case
    n = xs.size
    errors = data.draw(st.integers(0, (n - t) // 2))
    bad = data.draw(st.lists(st.integers(0, n - 1), min_size=errors, max_size=errors, unique=True))
    corrupted = shares.copy()
    for row in bad:  # any nonzero change to one or more limbs of that holder's share
        limb = data.draw(st.integers(0, shares.shape[1] - 1))
        corrupted[row, limb] = (corrupted[row, limb] + data.draw(st.integers(1, PRIME - 1))) % PRIME
    decoded = decode_shares(xs, corrupted, t)
    assert np.array_equal(decoded.limbs, secret)
    assert sorted(decoded.faulty_points) == sorted(int(xs[row]) for row in bad)


@settings(max_examples=100, deadline=None)
@given(shared_secrets(), st.data())
def test_more_wrong_shares_than_can_be_corrected_are_refused_never_decoded_wrongly(case, data) -> None:
    secret, xs, shares, t = case
    n = xs.size
    errors = (n - t) // 2 + 1
    if errors > n - t:  # N − t spare shares detect at most N − t wrong ones: t values fit any polynomial
        return
    bad = data.draw(st.lists(st.integers(0, n - 1), min_size=errors, max_size=errors, unique=True))
    corrupted = shares.copy()
    corrupted[bad] = random_field_elements(errors * shares.shape[1]).reshape(errors, -1)
    try:
        decoded = decode_shares(xs, corrupted, t)
    except UndecodableSharesError:
        return
    # random replacements may happen to stay on the polynomial only with probability ~1/p
    assert np.array_equal(decoded.limbs, secret)


def test_too_few_shares_and_bad_shapes_are_refused_with_the_reason() -> None:
    xs = np.arange(1, 4, dtype=np.int64)
    with pytest.raises(UndecodableSharesError, match="only 3 shares; threshold is 4"):
        locate_faulty(xs, np.zeros(3, dtype=np.int64), 4)
    with pytest.raises(UndecodableSharesError, match="expected shape"):
        decode_shares(xs, np.zeros((2, 4), dtype=np.int64), 2)


@pytest.mark.parametrize("server_threads", [1, 3])
def test_a_holder_returning_wrong_shares_cannot_sink_the_round(server_threads: int) -> None:
    """A survivor corrupts every share it returns at unmasking (self-mask seeds of survivors, the
    masking key of the dropped client): the server locates it, leaves it out, and the sum is exact,
    whether it expands its masks in one thread or several."""
    config = SecAggConfig(10, 5, 16, round_id=8)  # 9 survivors hold shares: e = (9 − 5) // 2 = 2
    r = ManualRound(config, server_threads=server_threads)
    r.advertise()
    out = r.step(r.step(r.close()), skip={9})
    replies = r.deliver(out)
    for liar in (2, 6):
        reply = replies[liar]
        assert isinstance(reply, UnmaskingResponse) and reply.mask_key_shares.size
        replies[liar] = dataclasses.replace(reply, self_mask_shares=(reply.self_mask_shares + 1) % PRIME,
                                            mask_key_shares=(reply.mask_key_shares + 3) % PRIME)
    r.send(replies)
    r.close()
    assert r.server.completed, r.server.abort_reason
    result = r.server.result
    assert result.faulty_holders == (2, 6)
    assert np.array_equal(result.ring_sum, ring_sum(config, r.inputs, range(9)))


def test_an_honest_round_reports_no_faulty_holder_and_too_many_liars_abort() -> None:
    config = SecAggConfig(10, 5, 16, round_id=9)
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.step(r.step(r.close())))
    assert r.server.completed and r.server.result.faulty_holders == ()
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.step(r.close()), skip={9})
    replies = r.deliver(out)
    for liar in (1, 2, 3):  # three of nine: more than (9 − 5) // 2 = 2
        reply = replies[liar]
        assert isinstance(reply, UnmaskingResponse)
        replies[liar] = dataclasses.replace(reply, self_mask_shares=(reply.self_mask_shares + 1) % PRIME)
    r.send(replies)
    r.close()
    assert r.server.aborted and "beyond correction" in (r.server.abort_reason or "")


@settings(max_examples=80, deadline=None)
@given(shared_secrets(), st.data())
def test_the_parity_check_catches_colluding_liars_that_know_their_true_shares(case, data) -> None:
    """Liars who shift their shares by δ·L(x), L vanishing at t − 1 honest points, stay on a
    polynomial of degree < t with those points: caught while they are at most N − t, and the
    bound is tight (N − t + 1 of them are a consistent, wrong codeword)."""
    _, xs, shares, t = case
    n = xs.size
    if n == t or t < 2:
        return
    column = fold_limbs(shares)
    assert on_one_polynomial(xs, column, t)
    liars = data.draw(st.integers(1, n - t))
    order = data.draw(st.permutations(range(n)))
    anchors, liar_rows = list(order[: t - 1]), list(order[n - liars:])
    delta = data.draw(st.integers(1, PRIME - 1))
    shifted = column.copy()
    for row in liar_rows:
        bump = delta
        for a in anchors:
            bump = bump * ((int(xs[row]) - int(xs[a])) % PRIME) % PRIME
        shifted[row] = (shifted[row] + bump) % PRIME
    assert not on_one_polynomial(xs, shifted, t)
    every_other = [r for r in range(n) if r not in anchors]  # N − t + 1 liars: undetectable
    for row in every_other:
        bump = delta
        for a in anchors:
            bump = bump * ((int(xs[row]) - int(xs[a])) % PRIME) % PRIME
        column[row] = (column[row] + bump) % PRIME
    assert on_one_polynomial(xs, column, t)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, PRIME - 1), min_size=1, max_size=80, unique=True))
def test_parity_weights_equal_the_integer_reference(xs: list[int]) -> None:
    expected = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xi - xj) % PRIME
        expected.append(pow(den, PRIME - 2, PRIME))
    assert parity_weights(np.asarray(xs, dtype=np.int64)).tolist() == expected
