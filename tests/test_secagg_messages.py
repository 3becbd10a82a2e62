"""Binary wire format of the secagg messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import MalformedMessageError
from fedveil.secagg.messages import (
    HEADER_BYTES,
    AdvertiseKeys,
    ConsistencyCheckRequest,
    ConsistencyCheckResponse,
    MaskedInputRequest,
    MaskedInputResponse,
    RoundAborted,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
    decode_message,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
key = st.binary(min_size=32, max_size=32)
sig = st.sampled_from([b"", b"s" * 64])
ids = st.lists(st.integers(0, 2**20), max_size=20, unique=True)
boxes = st.dictionaries(st.integers(0, 2**20), st.binary(max_size=200), max_size=10)


def _adv(rid):
    proof = st.one_of(st.just(b""), st.binary(min_size=96, max_size=96))
    return st.builds(AdvertiseKeys, st.just(rid), u32, key, key, sig, proof)


@st.composite
def messages(draw):
    rid, cid = draw(u64), draw(u32)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(_adv(rid))
    if kind == 1:
        return ShareKeysResponse(rid, cid, draw(boxes))
    if kind == 2:
        dtype = draw(st.sampled_from([np.uint32, np.uint64]))
        vals = draw(st.lists(u32, max_size=50))
        return MaskedInputResponse(rid, cid, np.array(vals, dtype=dtype))
    if kind == 3:
        return ConsistencyCheckResponse(rid, cid, draw(st.binary(min_size=64, max_size=64)))
    if kind == 4:
        a, b = draw(ids), draw(ids)
        salts = [np.frombuffer(draw(st.binary(min_size=16 * n, max_size=16 * n)), np.uint8).reshape(n, 16)
                 for n in (len(a), len(b))]
        return UnmaskingResponse(rid, cid,
                                 np.array(a, np.uint32), np.arange(8 * len(a), dtype=np.uint32).reshape(-1, 8),
                                 np.array(b, np.uint32), np.arange(16 * len(b), dtype=np.uint32).reshape(-1, 16),
                                 *salts)
    if kind == 5:
        return ShareKeysRequest(rid, cid, tuple(draw(st.lists(_adv(rid), max_size=5))))
    if kind == 6:
        return MaskedInputRequest(rid, cid, draw(boxes))
    if kind == 7:
        return ConsistencyCheckRequest(rid, cid, np.array(draw(ids), np.uint32))
    if kind == 8:
        return UnmaskingRequest(rid, cid, np.array(draw(ids), np.uint32), np.array(draw(ids), np.uint32),
                                draw(st.dictionaries(st.integers(0, 100), st.binary(min_size=64, max_size=64))))
    return RoundAborted(rid, cid, draw(st.text(max_size=40)))


def _fields(msg):
    out = {}
    for name, value in vars(msg).items():
        if isinstance(value, np.ndarray):
            out[name] = (value.dtype.itemsize, value.tolist())
        elif isinstance(value, tuple):
            out[name] = [_fields(v) for v in value]
        else:
            out[name] = value
    return type(msg).__name__, out


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(messages())
def test_roundtrip_and_exact_size(msg):
    data = msg.to_bytes()
    assert len(data) == msg.wire_size()
    back = decode_message(data)
    assert _fields(back) == _fields(msg)
    assert type(back).from_bytes(data) is not None


def test_masked_input_is_raw_little_endian_ring_elements():
    vec = np.arange(1000, dtype=np.uint32)
    msg = MaskedInputResponse(1, 2, vec)
    data = msg.to_bytes()
    assert len(data) == HEADER_BYTES + 5 + 4 * 1000
    assert data[-4000:] == vec.astype("<u4").tobytes()


@settings(max_examples=100, deadline=None)
@given(messages(), st.data())
def test_truncated_or_padded_bytes_rejected(msg, data):
    raw = msg.to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedMessageError):
        decode_message(raw[:cut])
    with pytest.raises(MalformedMessageError):
        decode_message(raw + b"\x00")


def test_bad_header_rejected():
    raw = bytearray(RoundAborted(1, 2, "x").to_bytes())
    for pos, value in ((0, ord("X")), (4, 9), (5, 99)):
        bad = bytearray(raw)
        bad[pos] = value
        with pytest.raises(MalformedMessageError):
            decode_message(bytes(bad))
    with pytest.raises(MalformedMessageError):
        AdvertiseKeys.from_bytes(bytes(raw))


def test_reprs_never_show_shares_or_secrets():
    """Shamir shares go to the server in the clear (by protocol), but never into logs via repr."""
    from fedveil.secagg import SecAggClient, SecAggConfig

    marker_sm, marker_mk = 1234567891, 1987654321
    salt = bytes(range(200, 216))  # a share's salt opens its commitment: as secret as the share
    msg = UnmaskingResponse(1, 2, np.array([3], np.uint32), np.full((1, 8), marker_sm, np.uint32),
                            np.array([4], np.uint32), np.full((1, 16), marker_mk, np.uint32),
                            np.frombuffer(salt, np.uint8).reshape(1, 16), np.zeros((1, 16), np.uint8))
    text = repr(msg) + str(msg)
    assert str(marker_sm) not in text and str(marker_mk) not in text
    assert "200, 201" not in text and "salt" not in text
    assert "UnmaskingResponse" in text and "client_id=2" in text
    decoded = decode_message(msg.to_bytes())
    assert decoded.self_mask_shares[0, 0] == marker_sm  # still on the wire
    assert decoded.self_mask_salts.tobytes() == salt and len(msg.to_bytes()) == msg.wire_size()
    client = SecAggClient(0, SecAggConfig(3, 2, 4, round_id=1), seed=bytes(range(32)))
    keys = client._ctx.keys
    secrets = [keys.self_mask_seed.hex(), keys.sharing_seed.hex(), keys.mask_private.private_bytes_raw().hex()]
    for obj in (client, client.state, client._ctx, keys):
        assert not any(s in repr(obj) for s in secrets)
