"""The client's secagg driver and update encoding against the real secagg server state machine.

The wire translation the coordinator does on its side is reproduced here in a few lines so the
client half (protobuf instruction -> secagg message -> protobuf reply) is checked end to end,
with the exact ring sum and a dropout.
"""

import numpy as np
import pytest

from fedveil.clients.secagg_driver import SecAggClientDriver, secagg_config
from fedveil.clients.update import RoundConfigError, derive_seed, encoder_for, prepare_update
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.encoding import FixedPointEncoder
from fedveil.secagg.messages import (
    MASK_KEY_LIMBS,
    SELF_MASK_LIMBS,
    AdvertiseKeys,
    MaskedInputRequest,
    MaskedInputResponse,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
)
from fedveil.secagg.server import SecAggServer

DIM = 50


def round_start(client_id: int, n: int, *, clip_norm: float = 0.0, weighted: bool = False) -> pb.RoundStart:
    enc = FixedPointEncoder.for_clients(n, clip=1.0, ring_bits=32, weighted=weighted, max_weight=100.0)
    return pb.RoundStart(
        round=3,
        round_nonce=b"\x01" * 16,
        client_id=client_id,
        encoding=pb.EncodingParams(
            ring_bits=32,
            clip_range=1.0,
            fractional_bits=enc.frac_bits,
            dimension=enc.encoded_length(DIM),
            weighted=weighted,
            max_weight=100.0 if weighted else 0.0,
        ),
        secagg=pb.SecAggParams(graph="complete", threshold=3, cohort_size=n, round_id=77, context=b"run-x"),
        dp=pb.DpParams(mode="none", update_clip_norm=clip_norm),
        training=pb.TrainingParams(seed=5),
    )


def run_round(n: int, deltas: list[np.ndarray], drop_at_masked: set[int], **kw) -> tuple[np.ndarray, list, tuple]:
    starts = [round_start(i, n, **kw) for i in range(n)]
    server = SecAggServer(secagg_config(starts[0]))
    drivers, prepared = [], []
    for i in range(n):
        p = prepare_update(
            deltas[i], starts[i], rounding_seed=derive_seed(b"k" * 32, "rounding", 3, i), weight=10.0 * (i + 1)
        )
        prepared.append(p)
        d = SecAggClientDriver(starts[i])
        d.set_input(p.ring_vector)
        keys = d.advertise()
        server.receive(
            i, AdvertiseKeys(77, i, keys["encryption_public_key"], keys["masking_public_key"], keys["signature"])
        )
        drivers.append(d)
    out = server.close_stage()
    for i, msg in out.items():
        assert isinstance(msg, ShareKeysRequest)
        peer_keys = pb.PeerKeys(
            round=3,
            keys=[
                pb.AdvertisedKeys(
                    client_id=a.client_id, encryption_public_key=a.share_public, masking_public_key=a.mask_public
                )
                for a in msg.advertisements
            ],
        )
        shares = drivers[i].share_keys(peer_keys)
        server.receive(i, ShareKeysResponse(77, i, {s.peer_id: s.ciphertext for s in shares}))
    out = server.close_stage()
    for i, msg in out.items():
        assert isinstance(msg, MaskedInputRequest)
        incoming = pb.IncomingShares(
            round=3, shares=[pb.EncryptedShare(peer_id=k, ciphertext=v) for k, v in msg.boxes.items()]
        )
        masked = drivers[i].masked_input(incoming)
        if i in drop_at_masked:
            continue
        assert len(masked) == 4 * starts[i].encoding.dimension
        server.receive(i, MaskedInputResponse(77, i, np.frombuffer(masked, dtype="<u4").copy()))
    out = server.close_stage()
    for i, msg in out.items():
        assert isinstance(msg, UnmaskingRequest)
        request = pb.UnmaskingRequest(round=3, survivors=msg.survivors.tolist(), dropped=msg.dropped.tolist())
        revealed = drivers[i].unmask(request)
        sm = [r for r in revealed if r.kind == pb.SHARE_KIND_SELF_MASK_SEED]
        mk = [r for r in revealed if r.kind == pb.SHARE_KIND_MASKING_KEY]
        server.receive(
            i,
            UnmaskingResponse(
                77,
                i,
                np.array([r.owner_id for r in sm], dtype=np.uint32),
                np.array([np.frombuffer(r.share, "<u4") for r in sm], dtype=np.uint32).reshape(
                    len(sm), SELF_MASK_LIMBS
                ),
                np.array([r.owner_id for r in mk], dtype=np.uint32),
                np.array([np.frombuffer(r.share, "<u4") for r in mk], dtype=np.uint32).reshape(len(mk), MASK_KEY_LIMBS),
                np.array([np.frombuffer(r.salt, np.uint8) for r in sm], dtype=np.uint8).reshape(len(sm), 16),
                np.array([np.frombuffer(r.salt, np.uint8) for r in mk], dtype=np.uint8).reshape(len(mk), 16),
            ),
        )
    server.close_stage()
    result = server.result
    return result.ring_sum, prepared, result.survivors


@pytest.mark.parametrize("dropped", [set(), {1}])
def test_unmasked_sum_is_exactly_the_sum_of_the_survivors_encodings(dropped: set[int]) -> None:
    rng = np.random.default_rng(0)
    n = 5
    deltas = [rng.normal(0, 0.3, DIM) for _ in range(n)]
    ring_sum, prepared, survivors = run_round(n, deltas, dropped)
    assert set(survivors) == set(range(n)) - dropped
    expected = np.zeros_like(ring_sum)
    for i in survivors:
        expected += prepared[i].ring_vector
    np.testing.assert_array_equal(ring_sum, expected)
    encoder = encoder_for(round_start(0, n).encoding, n)
    mean = encoder.decode_mean(ring_sum, len(survivors))
    true_mean = np.mean([np.clip(deltas[i], -1, 1) for i in survivors], axis=0)
    assert np.max(np.abs(mean - true_mean)) < encoder.error_bound(len(survivors))


def test_user_level_clipping_and_weighted_mean() -> None:
    rng = np.random.default_rng(1)
    n = 4
    deltas = [rng.normal(0, 1.0, DIM) for _ in range(n)]  # norms around 7: clipped to 0.5
    ring_sum, prepared, _survivors = run_round(n, deltas, set(), clip_norm=0.5, weighted=True)
    assert all(p.clipped for p in prepared)
    encoder = encoder_for(round_start(0, n, weighted=True).encoding, n)
    mean, total_weight = encoder.decode_weighted_mean(ring_sum)
    weights = [10.0 * (i + 1) for i in range(n)]
    assert total_weight == pytest.approx(sum(weights), abs=1e-3)
    clipped = [d * min(1.0, 0.5 / np.linalg.norm(d)) for d in deltas]
    expected = sum(w * c for w, c in zip(weights, clipped)) / sum(weights)
    np.testing.assert_allclose(mean, expected, atol=1e-3)
    assert np.linalg.norm(mean) <= 0.5 + 1e-3


def test_rounding_is_deterministic_given_the_seed() -> None:
    start = round_start(0, 3)
    delta = np.linspace(-0.5, 0.5, DIM)
    a = prepare_update(delta, start, rounding_seed=derive_seed(b"s" * 32, "rounding", 3, 5))
    b = prepare_update(delta, start, rounding_seed=derive_seed(b"s" * 32, "rounding", 3, 5))
    c = prepare_update(delta, start, rounding_seed=derive_seed(b"t" * 32, "rounding", 3, 5))
    np.testing.assert_array_equal(a.ring_vector, b.ring_vector)
    assert not np.array_equal(a.ring_vector, c.ring_vector)


def test_wrong_dimension_is_named() -> None:
    start = round_start(0, 3)
    with pytest.raises(RoundConfigError, match=r"encoding\.dimension"):
        prepare_update(np.zeros(DIM + 1), start, rounding_seed=b"\x00" * 16)


def test_the_collusion_fraction_travels_into_the_config_and_an_unsafe_threshold_is_refused():
    from fedveil.secagg import ConfigError

    start = round_start(0, 5)
    plain = secagg_config(start)
    start.secagg.max_corrupt_fraction = 1 / 3
    config = secagg_config(start)
    assert config.max_corrupt_fraction == 1 / 3  # bound into the session id: both sides must agree
    assert config.parameters_bytes() != plain.parameters_bytes()
    start.secagg.max_corrupt_fraction = 0.4  # c = 2 of 5 colluders: t = 3 > c still holds
    assert secagg_config(start).threshold == 3
    start.secagg.threshold = 2  # ... t = 2 does not
    with pytest.raises(ConfigError, match="threshold: t=2 does not exceed the c=2 colluders"):
        SecAggClientDriver(start)


def test_advertisements_are_parsed_from_the_exact_bytes_each_site_received() -> None:
    """The memo shared by the sites of one process: the same bytes give the same (immutable) tuple;
    a server that sends one site a substituted key gets that site a tuple holding that key."""
    import os

    from fedveil.clients.shared_round_views import advertisements_of

    def keys(swap: bytes | None = None) -> pb.PeerKeys:
        rng = np.random.default_rng(7)
        out = pb.PeerKeys(round=2, deadline_unix_ms=1)
        for cid in range(1, 6):
            share = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
            out.keys.append(pb.AdvertisedKeys(client_id=cid, encryption_public_key=swap if swap and cid == 3 else share,
                                              masking_public_key=bytes(32 - cid) + bytes([cid] * cid),
                                              signature=bytes([cid]) * 64))
        return out

    honest = keys().SerializeToString()
    first = advertisements_of(honest, 9)
    assert advertisements_of(keys().SerializeToString(), 9) is first
    assert [a.client_id for a in first] == [1, 2, 3, 4, 5]
    assert all(a.round_id == 9 for a in first)
    assert first[4].signature == bytes([5]) * 64
    substituted = os.urandom(32)
    other = advertisements_of(keys(swap=substituted).SerializeToString(), 9)
    assert other is not first
    assert other[2].share_public == substituted and first[2].share_public != substituted
    assert advertisements_of(honest, 10)[0].round_id == 10  # another round: its own entry
