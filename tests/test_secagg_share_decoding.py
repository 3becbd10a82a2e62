"""Error-correcting share reconstruction (Berlekamp–Welch): wrong shares from up to ⌊(N − t)/2⌋
shares are located and left out, more are refused; a holder returning a share its owner did not
commit to is refused and named, and an owner dealing wrong shares is named."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import ProtocolError, SecAggConfig
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
from tests.secagg_helpers import ManualRound, redeal, ring_sum


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
def test_holders_returning_wrong_shares_cannot_sink_the_round(server_threads: int) -> None:
    """Two survivors corrupt every share they return at unmasking (self-mask seeds of survivors, the
    masking key of the dropped client): no share opens its owner's commitment, so both answers are
    refused, both liars are named, and the round completes exactly from the other seven, whether the
    server expands its masks in one thread or several."""
    config = SecAggConfig(10, 5, 16, round_id=8)
    r = ManualRound(config, server_threads=server_threads)
    r.advertise()
    out = r.step(r.step(r.close()), skip={9})
    replies = r.deliver(out)
    for liar in (2, 6):
        reply = replies.pop(liar)
        assert isinstance(reply, UnmaskingResponse) and reply.mask_key_shares.size
        lie = dataclasses.replace(reply, self_mask_shares=(reply.self_mask_shares + 1) % PRIME,
                                  mask_key_shares=(reply.mask_key_shares + 3) % PRIME)
        with pytest.raises(ProtocolError, match="did not commit to"):
            r.server.receive(liar, lie)
    r.send(replies)
    r.close()
    assert r.server.completed, r.server.abort_reason
    result = r.server.result
    assert result.faulty_holders == (2, 6) and set(r.server.misconduct) == {2, 6}
    assert np.array_equal(result.ring_sum, ring_sum(config, r.inputs, range(9)))


def test_an_honest_round_names_nobody() -> None:
    config = SecAggConfig(10, 5, 16, round_id=9)
    r = ManualRound(config)
    r.advertise()
    r.step(r.step(r.step(r.close())))
    assert r.server.completed and r.server.result.faulty_holders == () and r.server.misconduct == {}


def _dealt_wrong(bad_holders: set[int], owner: int, config: SecAggConfig) -> ManualRound:
    """A round in which ``owner`` deals wrong shares (committed to, so its holders return them) to
    ``bad_holders``, and client 9 drops out before its masked input."""
    r = ManualRound(config)
    r.advertise()
    replies = r.deliver(r.close())

    def tamper(holders: list[int], shares: np.ndarray) -> np.ndarray:
        for row, holder in enumerate(holders):
            if holder in bad_holders:
                shares[row] = (shares[row] + 1 + holder) % PRIME
        return shares

    redeal(r, replies, owner, tamper=tamper)
    r.send(replies)
    r.step(r.step(r.close(), skip={9}))
    return r


def test_an_owner_dealing_a_few_wrong_shares_is_named_and_the_round_still_completes() -> None:
    """Owner 3 deals wrong shares to holders 2 and 6, which return them faithfully: every share opens
    its commitment, so the inconsistency is the owner's. Berlekamp–Welch recovers its seed around the
    two (9 shares, t = 5: e = 2), the sum is exact, and only the owner is named, not the holders."""
    config = SecAggConfig(10, 5, 16, round_id=10)
    r = _dealt_wrong({2, 6}, 3, config)
    assert r.server.completed, r.server.abort_reason
    assert r.server.result.faulty_holders == ()
    assert set(r.server.misconduct) == {3} and "self-mask seed" in r.server.misconduct[3]
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(9)))


def test_an_owner_dealing_too_many_wrong_shares_aborts_the_round_and_is_named() -> None:
    config = SecAggConfig(10, 5, 16, round_id=11)
    r = _dealt_wrong({1, 2, 5}, 3, config)  # three of nine: more than (9 − 5) // 2 = 2
    assert r.server.aborted and "beyond correction" in (r.server.abort_reason or "")
    assert set(r.server.misconduct) == {3}
    r = _dealt_wrong({1, 2, 5}, 9, config)  # the same dealing by the client that drops: its masking key
    assert r.server.aborted and "masking key of client 9" in (r.server.abort_reason or "")
    assert set(r.server.misconduct) == {9} and "masking key" in r.server.misconduct[9]


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
