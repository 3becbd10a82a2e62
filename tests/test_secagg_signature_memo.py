"""Ed25519 verdicts shared by a simulation's sites (``fedveil.secagg.signature_memo``): the same
decisions as verifying alone, each distinct signature verified once, a forged signature never
inheriting a valid one's verdict, and a bounded memory."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg import ConfigError, SecAggConfig, plan_threshold
from fedveil.secagg import signature_memo as memo_module
from fedveil.secagg.keys import valid_signatures
from fedveil.secagg.signature_memo import SignatureMemo
from fedveil.secagg.simulation import run_round


def _signed(payload: bytes) -> tuple[Ed25519PrivateKey, tuple[bytes, bytes, bytes]]:
    key = Ed25519PrivateKey.generate()
    return key, (key.public_key().public_bytes_raw(), key.sign(payload), payload)


def test_the_memo_gives_the_verdicts_of_verifying_alone() -> None:
    _key, good = _signed(b"survivors 1,2,3")
    public, signature, payload = good
    other_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    items = [good, (public, forged, payload), (public, signature, b"survivors 1,2"), (other_key, signature, payload),
             (public[:31], signature, payload), (public, signature[:63], payload), good]
    memo = SignatureMemo()
    assert memo.valid_signatures(items) == valid_signatures(items) == [True, False, False, False, False, False, True]
    # asked again, now from the memo: the forged signature on the same payload is still refused
    assert memo.valid_signatures(list(reversed(items))) == list(reversed(valid_signatures(items)))
    assert memo.verified == 6 and memo.reused == 8  # the repeated item and the second call


def test_each_distinct_signature_is_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []

    def counting(items):  # type: ignore[no-untyped-def]
        batches.append(len(items))
        return valid_signatures(items)

    monkeypatch.setattr(memo_module, "valid_signatures", counting)
    items = [_signed(f"set {i}".encode())[1] for i in range(20)]
    memo = SignatureMemo()
    for _ in range(5):  # five sites of one process check the same twenty signatures
        assert memo.valid_signatures(items) == [True] * 20
    assert batches == [20]  # one batch, the first site's
    assert memo.valid_signatures([*items[:3], _signed(b"new")[1]]) == [True] * 4
    assert batches == [20, 1]


def test_the_memo_keeps_its_most_recent_verdicts_only() -> None:
    memo = SignatureMemo(max_entries=4)
    items = [_signed(f"p{i}".encode())[1] for i in range(6)]
    memo.valid_signatures(items)
    assert len(memo) == 4
    memo.valid_signatures(items[-4:])
    assert memo.verified == 6  # the four kept were not verified again
    with pytest.raises(ConfigError, match="max_entries"):
        SignatureMemo(max_entries=0)


def test_an_active_round_with_one_memo_is_exact_and_shares_the_verdicts() -> None:
    n = 100
    plan = plan_threshold(n, "harary", expected_dropout=0.1)
    assert plan.degree == 90  # a sparse Harary graph
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    config = SecAggConfig(n, plan.threshold, 64, round_id=5, active=True, graph=plan.spec,
                          identity_keys=tuple(k.public_key().public_bytes_raw() for k in keys),
                          graph_seed=os.urandom(32))
    inputs = {u: np.random.default_rng(u).integers(0, 2**20, 64, dtype=np.uint32) for u in range(n)}
    memo = SignatureMemo()
    sim = run_round(config, inputs, dropouts={"masked": {3, 17}}, identity_keys=dict(enumerate(keys)),
                    signature_memo=memo)
    assert sim.completed, sim.abort_reason
    survivors = [u for u in range(n) if u not in (3, 17)]
    expected = np.sum([inputs[u] for u in survivors], axis=0, dtype=np.uint64).astype(np.uint32)
    assert np.array_equal(sim.result.ring_sum, expected)
    # each advertisement and survivor-set signature was verified once, then reused by the other sites
    assert memo.verified <= n + len(survivors) and memo.reused > memo.verified
