"""Key agreement, session ids, configuration checks, and rounds with encoded float inputs."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import ConfigError, FixedPointEncoder, GraphSpec, SecAggClient, SecAggConfig, run_round
from fedveil.secagg.keys import (
    PARALLEL_VERIFY_MIN,
    generate_round_keys,
    pairwise_mask_seed,
    session_id,
    share_box_key,
    share_secret,
    valid_signatures,
)
from fedveil.secagg.messages import SELF_MASK_LIMBS
from fedveil.secagg.shamir import bytes_to_limbs
from tests.secagg_helpers import ManualRound, random_inputs, redeal


def test_pairwise_seed_is_symmetric_and_session_bound():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = a.public_key().public_bytes_raw(), b.public_key().public_bytes_raw()
    sid = os.urandom(32)
    assert pairwise_mask_seed(a, pb, 3, 9, sid) == pairwise_mask_seed(b, pa, 9, 3, sid)
    assert pairwise_mask_seed(a, pb, 3, 9, sid) != pairwise_mask_seed(a, pb, 3, 9, os.urandom(32))
    assert len(pairwise_mask_seed(a, pb, 3, 9, sid)) == 16
    shared = share_secret(a, pb)
    assert shared == share_secret(b, pa)
    assert share_box_key(shared, 3, 9, sid) != share_box_key(shared, 9, 3, sid)  # one key per direction


def test_session_id_hashes_round_parameters_and_every_key():
    keys = [(i, os.urandom(32), os.urandom(32)) for i in range(5)]
    base = session_id(7, b"params", keys)
    assert session_id(7, b"params", list(reversed(keys))) == base  # order-free
    assert session_id(8, b"params", keys) != base
    assert session_id(7, b"other", keys) != base
    changed = [*keys[:4], (4, keys[4][1], os.urandom(32))]
    assert session_id(7, b"params", changed) != base
    assert session_id(7, b"params", keys[:4]) != base


def test_seeded_clients_are_reproducible_and_unseeded_ones_are_not():
    cfg = SecAggConfig(3, 2, 4, round_id=1)
    seed = os.urandom(32)
    a = SecAggClient(0, cfg, seed=seed).advertise_keys()
    b = SecAggClient(0, cfg, seed=seed).advertise_keys()
    c = SecAggClient(0, cfg).advertise_keys()
    assert (a.share_public, a.mask_public) == (b.share_public, b.mask_public)
    assert a.share_public != c.share_public and a.share_public != a.mask_public
    k = generate_round_keys(seed)
    assert repr(k) == "RoundKeys(<secret>)"


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="num_clients"):
        SecAggConfig(1, 1, 4)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(5, 6, 4)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(20, 8, 4, graph=GraphSpec("harary", 4))  # holders are k + 1 = 5
    with pytest.raises(ConfigError, match="vector_length"):
        SecAggConfig(5, 3, 0)
    with pytest.raises(ConfigError, match="round_id"):
        SecAggConfig(5, 3, 4, round_id=-1)
    with pytest.raises(ConfigError, match="identity_keys"):
        SecAggConfig(5, 4, 4, active=True)
    with pytest.raises(ConfigError, match="max_corrupt_fraction"):
        SecAggConfig(5, 3, 4, max_corrupt_fraction=0.5)
    with pytest.raises(ConfigError, match="max_corrupt_fraction"):
        SecAggConfig(5, 3, 4, max_corrupt_fraction=float("nan"))
    with pytest.raises(ConfigError, match="client_id"):
        SecAggClient(5, SecAggConfig(5, 3, 4))
    with pytest.raises(ConfigError, match="input"):
        SecAggClient(0, SecAggConfig(5, 3, 4)).set_input(np.zeros(5, np.uint32))


def test_round_on_encoded_floats_decodes_to_the_mean():
    n, dim = 9, 1000
    enc = FixedPointEncoder.for_clients(n, clip=1.0)
    rng = np.random.default_rng(3)
    xs = rng.normal(0, 0.5, (n, dim)).astype(np.float32)
    cfg = SecAggConfig(n, 4, enc.encoded_length(dim), round_id=2, graph=GraphSpec("harary", 4))
    inputs = {c: enc.encode(xs[c], os.urandom(16)) for c in range(n)}
    sim = run_round(cfg, inputs, dropouts={"masked": {4}})
    survivors = list(sim.result.survivors)
    mean = enc.decode_mean(sim.result.ring_sum, len(survivors))
    expected = np.clip(xs[survivors].astype(np.float64), -1, 1).mean(axis=0)
    assert np.max(np.abs(mean - expected)) < enc.error_bound(len(survivors))


def test_weighted_round():
    n, dim = 6, 50
    enc = FixedPointEncoder.for_clients(n, clip=1.0, weighted=True, max_weight=1000.0)
    rng = np.random.default_rng(4)
    xs = rng.uniform(-1, 1, (n, dim)).astype(np.float32)
    ws = rng.integers(1, 1000, n).astype(float)
    cfg = SecAggConfig(n, 4, enc.encoded_length(dim), round_id=2)
    inputs = {c: enc.encode(xs[c], os.urandom(16), weight=float(ws[c])) for c in range(n)}
    sim = run_round(cfg, inputs, dropouts={"shares": {0}})
    mean, weight = enc.decode_weighted_mean(sim.result.ring_sum)
    keep = list(sim.result.survivors)
    expected = (ws[keep, None] * xs[keep].astype(np.float64)).sum(axis=0) / ws[keep].sum()
    assert weight == pytest.approx(ws[keep].sum(), abs=len(keep) / enc.scale)
    assert np.allclose(mean, expected, atol=1e-6)


def test_an_owner_that_shares_another_masking_key_aborts_the_round_and_is_proven_at_fault():
    """Client 5 deals a consistent sharing of a masking key that is not the one it advertised, then
    drops out: the shares interpolate to a well-formed key, the server sees it is not the advertised
    one, aborts (nothing unmasked) and names client 5, not the holders that returned the shares."""
    cfg = SecAggConfig(6, 3, 16, round_id=5)
    r = ManualRound(cfg, random_inputs(cfg))
    r.advertise()
    replies = r.deliver(r.close())
    # Shift the second 16-bit limb of client 5's key by one (the first holds bits X25519 clamps
    # away), staying inside 0..0xFFFF so the shares interpolate to a well-formed key that is
    # simply not the advertised one.
    ctx = r.clients[5]._ctx
    secrets = np.concatenate([bytes_to_limbs(ctx.keys.self_mask_seed),
                              bytes_to_limbs(ctx.keys.mask_private.private_bytes_raw())])
    limb = SELF_MASK_LIMBS + 1
    secrets[limb] += 1 if secrets[limb] < 0xFFFF else -1
    redeal(r, replies, 5, secrets=secrets)
    r.send(replies)
    out = r.step(r.close(), skip={5})
    r.step(out)
    assert r.server.aborted
    assert "not the advertised one" in (r.server.abort_reason or "")
    assert set(r.server.misconduct) == {5} and "masking key" in r.server.misconduct[5]


# X25519 public keys of small order (canonical u-coordinates and their non-canonical encodings):
# any exchange with them yields the all-zero secret, which OpenSSL refuses with a bare ValueError.
_P25519 = 2**255 - 19
_SMALL_ORDER_U = (0, 1, _P25519 - 1, _P25519, _P25519 + 1,
                  int.from_bytes(bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
                                 "little"),
                  int.from_bytes(bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
                                 "little"))
SMALL_ORDER_KEYS = [(u | high).to_bytes(32, "little") for u in _SMALL_ORDER_U for high in (0, 1 << 255)
                    if (u | high) < 1 << 256]


@pytest.mark.parametrize("bad", SMALL_ORDER_KEYS[::3], ids=lambda key: key[:4].hex())
def test_server_rejects_small_order_public_keys_and_round_goes_on(bad):
    from fedveil.secagg import ProtocolError

    cfg = SecAggConfig(5, 3, 8, round_id=6, graph=GraphSpec())
    r = ManualRound(cfg)
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    for field in ("share_public", "mask_public"):
        with pytest.raises(ProtocolError, match="small order"):
            r.server.receive(4, dataclasses.replace(advs[4], **{field: bad}))
    for c in range(4):
        r.server.receive(c, advs[c])
    out = r.step(r.close(), skip={4})
    out = r.step(out)
    r.step(out)
    assert r.server.result.survivors == (0, 1, 2, 3)


def test_client_names_a_small_order_key_forwarded_by_the_server():
    from fedveil.secagg import ProtocolError

    cfg = SecAggConfig(4, 3, 8, round_id=6)
    r = ManualRound(cfg)
    r.advertise()
    out = r.close()
    msg = out[0]
    bad = tuple(dataclasses.replace(a, mask_public=SMALL_ORDER_KEYS[0]) if a.client_id == 2 else a
                for a in msg.advertisements)
    with pytest.raises(ProtocolError, match="client 2"):
        r.clients[0].handle(dataclasses.replace(msg, advertisements=bad))
    assert r.clients[0].aborted
    # Also when the key reaches the Diffie-Hellman step directly: a named error, never ValueError.
    from fedveil.secagg.keys import is_small_order, pairwise_mask_seed, share_secret

    assert all(is_small_order(key) for key in SMALL_ORDER_KEYS)
    assert not any(is_small_order(X25519PrivateKey.generate().public_key().public_bytes_raw()) for _ in range(50))
    with pytest.raises(ProtocolError):
        share_secret(X25519PrivateKey.generate(), SMALL_ORDER_KEYS[1])
    with pytest.raises(ProtocolError):
        pairwise_mask_seed(X25519PrivateKey.generate(), SMALL_ORDER_KEYS[2], 0, 1, bytes(32))


def test_a_reused_seed_gives_fresh_secrets_in_every_round_and_for_every_client():
    """A caller that passes the same seed again (another round, another client id) must not get
    the same self-mask seed or masking key: a server that learnt b in one round (the client
    survived) and s_sk in another (it was named dropped) would otherwise unmask its input."""
    seed = os.urandom(32)
    cfg = SecAggConfig(3, 2, 4, round_id=1)

    def secrets(client_id, config):
        keys = SecAggClient(client_id, config, seed=seed)._ctx.keys
        return keys.self_mask_seed, keys.mask_private.private_bytes_raw(), keys.share_public, keys.sharing_seed

    base = secrets(0, cfg)
    assert secrets(0, cfg) == base  # reproducible within one round
    for other in (secrets(0, cfg.for_round(2)), secrets(1, cfg), secrets(0, dataclasses.replace(cfg, threshold=3))):
        assert all(a != b for a, b in zip(base, other, strict=True))


@pytest.mark.parametrize("change", [dict(context=b"another federation"), dict(threshold=4), dict(ring_bits=31),
                                    dict(vector_length=9), dict(max_corrupt_fraction=0.25)])
def test_parties_with_different_parameters_derive_different_sessions(change):
    """The session id a client derives hashes the round parameters: a client configured with
    any other parameter (and the same round id and keys) cannot open its peers' share boxes,
    and they cannot open its boxes."""
    from fedveil.secagg import ShareDecryptionError
    from fedveil.secagg.messages import MaskedInputRequest

    cfg = SecAggConfig(5, 3, 8, round_id=3)
    odd = dataclasses.replace(cfg, **change)
    r = ManualRound(cfg)
    r.clients[0] = SecAggClient(0, odd)
    r.clients[0].set_input(odd.ring.zeros(odd.vector_length))
    r.advertise()
    out = r.step(r.close())
    assert all(isinstance(m, MaskedInputRequest) for m in out.values())
    for c in (0, 1):
        with pytest.raises(ShareDecryptionError, match="from client 0" if c else "failed authentication"):
            r.clients[c].handle(out[c])


_SIGNERS = [Ed25519PrivateKey.generate() for _ in range(4)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=40),
                          st.sampled_from(("good", "other payload", "other key", "garbage", "short key"))),
                min_size=0, max_size=3 * PARALLEL_VERIFY_MIN))
def test_valid_signatures_answers_each_item_in_order(specs):
    """Batches at and above PARALLEL_VERIFY_MIN are split over a thread pool; the answer must be
    item by item, in order, whatever the mix of good and bad signatures and wherever the split falls."""
    items, expected = [], []
    for who, payload, how in specs:
        key = _SIGNERS[who]
        signature = key.sign(payload)
        public = key.public_key().public_bytes_raw()
        if how == "other payload":
            signature = key.sign(payload + b"!")
        elif how == "other key":
            public = _SIGNERS[(who + 1) % 4].public_key().public_bytes_raw()
        elif how == "garbage":
            signature = bytes(64)
        elif how == "short key":
            public = public[:31]
        items.append((public, signature, payload))
        expected.append(how == "good")
    assert valid_signatures(items) == expected


def test_a_large_batch_names_bad_signatures_in_every_chunk():
    key = _SIGNERS[0]
    public = key.public_key().public_bytes_raw()
    n = 3 * PARALLEL_VERIFY_MIN + 1
    bad = {0, PARALLEL_VERIFY_MIN + 1, n - 1}
    items = [(public, bytes(64) if i in bad else key.sign(b"%d" % i), b"%d" % i) for i in range(n)]
    assert [i for i, ok in enumerate(valid_signatures(items)) if not ok] == sorted(bad)


# A reference for Ed25519's small-order rule, independent of the library's y-coordinate test:
# [8]P by three doublings with the complete addition law (a = -1), inverses by Fermat.
_P = (1 << 255) - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_IDENTITY = (0, 1)


def _reference_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + y1 * x2) * pow(1 + t, _P - 2, _P) % _P, (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P)


def _times_eight(point: tuple[int, int]) -> tuple[int, int]:
    for _ in range(3):
        point = _reference_add(point, point)
    return point


def _encode_point(point: tuple[int, int]) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _torsion_subgroup() -> list[tuple[int, int]]:
    """The eight points of order dividing 8, as the multiples of one point of order 8."""
    from fedveil.secagg.keys import _ed25519_decode

    order_eight = _ed25519_decode(bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"))
    assert order_eight is not None and _times_eight(order_eight) == _IDENTITY
    points, point = [], _IDENTITY
    for _ in range(8):
        points.append(point)
        point = _reference_add(point, order_eight)
    assert len(set(points)) == 8  # the point has order exactly 8
    return points


TORSION = _torsion_subgroup()


def test_every_point_of_small_order_is_refused_and_mixed_order_points_are_not() -> None:
    from fedveil.secagg.keys import _ed25519_decode, ed25519_public_key_problem

    for torsion in TORSION:
        assert "small order" in (ed25519_public_key_problem(_encode_point(torsion)) or "")
    public = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes_raw()
    point = _ed25519_decode(public)
    assert point is not None
    for torsion in TORSION:  # P + T has a large-order part: nobody can sign under it without P's secret
        mixed = _reference_add(point, torsion)
        assert _times_eight(mixed) != _IDENTITY
        assert ed25519_public_key_problem(_encode_point(mixed)) is None


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(min_size=32, max_size=32), torsion_index=st.integers(0, 7))
def test_the_small_order_check_agrees_with_eight_times_p(raw: bytes, torsion_index: int) -> None:
    from fedveil.secagg.keys import _ed25519_decode, ed25519_public_key_problem

    public = Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    for candidate in (raw, public, _encode_point(_reference_add(_ed25519_decode(public) or _IDENTITY,
                                                               TORSION[torsion_index]))):
        decoded = _ed25519_decode(candidate)
        problem = ed25519_public_key_problem(candidate)
        if decoded is None:
            assert problem == "does not encode a point of Ed25519"
        elif _times_eight(decoded) == _IDENTITY:
            assert problem is not None and "small order" in problem
        else:
            assert problem is None
