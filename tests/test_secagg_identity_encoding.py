"""Site credentials' encodings (fedveil.secagg.identity_encoding): round trips, fuzzed decoders, and
the field checks every issued or decoded credential passes, small-order keys included.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg.errors import (
    CredentialError,
    InvalidCredentialSignature,
    InvalidRevocationList,
    MalformedCredentialError,
)
from fedveil.secagg.identity import (
    CREDENTIAL_TAG,
    REVOCATIONS_TAG,
    AuthorityPublicKey,
    RevocationList,
    SiteCredential,
    issue_credential,
    issue_revocations,
    verify_credential,
    verify_revocations,
)
from tests.credential_helpers import (
    AUTHORITY,
    CONSORTIUM,
    DAY,
    NOW,
    PINNED,
    VALID,
    VALID_LIST,
    credential,
    raw,
    site_key,
    verify,
)

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
times = st.integers(0, 2**63 - 2)


@settings(max_examples=60, deadline=None)
@given(consortium=names, name=names, seed=st.binary(min_size=32, max_size=32),
       serial=st.binary(min_size=16, max_size=16), start=times, length=st.integers(1, 10**9))
@pytest.mark.slow
def test_credential_round_trips(consortium: str, name: str, seed: bytes, serial: bytes, start: int,
                                length: int) -> None:
    key = raw(Ed25519PrivateKey.from_private_bytes(seed))
    cred = issue_credential(AUTHORITY, consortium, name, key, not_before=start,
                            not_after=min(start + length, 2**63 - 1), serial=serial)
    data = cred.encode()
    assert SiteCredential.decode(data) == cred
    assert SiteCredential.decode(bytearray(data)) == cred and SiteCredential.decode(memoryview(data)) == cred
    assert len(data) == 6 + 2 + len(consortium) + 2 + len(name) + 32 + 16 + 16 + 64
    verify_credential(PINNED, cred, consortium=consortium, now=start, revocations=None)


@settings(max_examples=40, deadline=None)
@given(consortium=names, version=times, issued=times,
       serials=st.frozensets(st.binary(min_size=16, max_size=16), max_size=20))
def test_revocation_list_round_trips(consortium: str, version: int, issued: int, serials: frozenset[bytes]) -> None:
    rl = issue_revocations(AUTHORITY, consortium, version=version, issued_at=issued, revoked=serials)
    assert RevocationList.decode(rl.encode()) == rl
    verify_revocations(PINNED, rl, consortium=consortium)


def test_signatures_are_domain_separated() -> None:
    assert VALID.signed_payload().startswith(CREDENTIAL_TAG + b"\x00")
    assert VALID_LIST.signed_payload().startswith(REVOCATIONS_TAG + b"\x00")
    # a signature made for one kind of object is worthless as the other
    as_list = dataclasses.replace(VALID_LIST, signature=VALID.signature)
    with pytest.raises(InvalidRevocationList):
        verify_revocations(PINNED, as_list, consortium=CONSORTIUM)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: b"FVID\x01\x01" + b)
       | st.binary(max_size=300).map(lambda b: b"FVID\x01\x02" + b))
def test_decoders_raise_only_malformed_on_arbitrary_bytes(data: bytes) -> None:
    for cls in (SiteCredential, RevocationList):
        try:
            obj = cls.decode(data)
        except MalformedCredentialError as err:
            assert err.field and isinstance(err, CredentialError)
        else:
            assert obj.encode() == data  # the encoding is canonical: only one byte string per value


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one byte flipped, cut short, extended, spliced into or overwritten."""
    kind = draw(st.sampled_from(["flip", "truncate", "append", "splice", "set"]))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=40))
    if kind == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=20)) + data[i:]
    i = draw(st.integers(0, len(data) - 2))
    return data[:i] + draw(st.binary(min_size=2, max_size=2)) + data[i + 2:]


@settings(max_examples=300, deadline=None)
@given(data=mutations(VALID.encode()))
def test_a_mutated_credential_never_verifies(data: bytes) -> None:
    try:
        cred = SiteCredential.decode(data)
    except MalformedCredentialError:
        return
    if data == VALID.encode():
        return
    with pytest.raises(InvalidCredentialSignature):
        verify(cred)


@settings(max_examples=200, deadline=None)
@given(data=mutations(VALID_LIST.encode()))
def test_a_mutated_revocation_list_never_verifies(data: bytes) -> None:
    try:
        rl = RevocationList.decode(data)
    except MalformedCredentialError:
        return
    if data == VALID_LIST.encode():
        return
    with pytest.raises(InvalidRevocationList):
        verify_revocations(PINNED, rl, consortium=CONSORTIUM)


@pytest.mark.parametrize(("data", "field"), [
    (b"", "header"),
    (b"XXXX\x01\x01", "magic"),
    (b"FVID\x02\x01", "version"),
    (b"FVID\x01\x02", "kind"),
    (VALID.encode()[:-1], "signature"),
    (VALID.encode() + b"\x00", "encoding"),
    (VALID.encode()[:6] + b"\x04\x00ab\xffd" + VALID.encode()[12:], "consortium"),
])
def test_decode_names_the_field(data: bytes, field: str) -> None:
    with pytest.raises(MalformedCredentialError) as info:
        SiteCredential.decode(data)
    assert info.value.field == field


def test_revocation_list_rejects_unsorted_or_duplicate_serials() -> None:
    body = VALID_LIST.encode()[:-64]
    a, b = body[-32:-16], body[-16:]
    for serials in (b + a, a + a):
        with pytest.raises(MalformedCredentialError) as info:
            RevocationList.decode(body[:-32] + serials + VALID_LIST.signature)
        assert info.value.field == "revoked"


def test_revocation_list_with_a_huge_count_is_rejected_before_reading() -> None:
    data = bytearray(VALID_LIST.encode())
    count_at = 6 + 2 + len(CONSORTIUM) + 16
    data[count_at: count_at + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(MalformedCredentialError) as info:
        RevocationList.decode(bytes(data))
    assert info.value.field == "revoked"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"site_name": "bad name"}, "site_name"),
    ({"site_name": "a\n"}, "site_name"),
    ({"site_name": ""}, "site_name"),
    ({"site_name": "x" * 65}, "site_name"),
    ({"consortium": "café"}, "consortium"),
    ({"identity_public_key": b"\x00" * 31}, "identity_public_key"),
    ({"identity_public_key": bytearray(32)}, "identity_public_key"),
    ({"not_before": True}, "not_before"),
    ({"not_before": -1}, "not_before"),
    ({"not_after": 2**63}, "not_after"),
    ({"not_after": NOW - DAY}, "not_after"),
    ({"serial": b"\x00" * 15}, "serial"),
])
def test_issue_rejects_bad_fields(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"consortium": CONSORTIUM, "site_name": "site", "identity_public_key": raw(site_key(0)),
                               "not_before": NOW - DAY, "not_after": NOW + DAY, "serial": None, **kwargs}
    with pytest.raises(MalformedCredentialError) as info:
        issue_credential(AUTHORITY, args.pop("consortium"), args.pop("site_name"),  # type: ignore[arg-type]
                         args.pop("identity_public_key"), **args)  # type: ignore[arg-type]
    assert info.value.field == field


# Encodings of Ed25519 points of small order: the identity, the points of order 2 and 4, and
# two of order 8 (libsodium's blocklist), with and without the sign bit.
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "01" + "00" * 31, "00" * 32, "00" * 31 + "80", "ec" + "ff" * 30 + "7f",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
)]


def test_openssl_accepts_forged_signatures_under_the_identity_point() -> None:
    """Why small-order keys are refused: a signature under A = identity is forgeable for any
    message (R = sB for any s), and OpenSSL's cofactorless check accepts it."""
    seed = bytes(range(32))
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] = (h[31] & 127) | 64
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(h, "little") % order
    forged = raw(Ed25519PrivateKey.from_private_bytes(seed)) + s.to_bytes(32, "little")  # R = sB
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(SMALL_ORDER[0]).verify(forged, b"any round keys the server likes")


@pytest.mark.parametrize("key", SMALL_ORDER)
def test_small_order_keys_are_refused_everywhere(key: bytes) -> None:
    with pytest.raises(MalformedCredentialError, match="small order") as info:
        issue_credential(AUTHORITY, CONSORTIUM, "s", key, not_before=0, not_after=1)
    assert info.value.field == "identity_public_key"
    encoded = bytearray(VALID.encode())
    at = 6 + 2 + len(CONSORTIUM) + 2 + len(VALID.site_name)
    encoded[at: at + 32] = key
    with pytest.raises(MalformedCredentialError, match="small order"):
        SiteCredential.decode(bytes(encoded))
    with pytest.raises(MalformedCredentialError, match="small order"):
        AuthorityPublicKey(key)


@pytest.mark.parametrize("key", ["ed" + "ff" * 30 + "7f", "02" + "00" * 31, "01" + "00" * 30 + "80"])
def test_encodings_of_no_point_are_refused(key: str) -> None:
    with pytest.raises(MalformedCredentialError, match="does not encode a point") as info:
        issue_credential(AUTHORITY, CONSORTIUM, "s", bytes.fromhex(key), not_before=0, not_after=1)
    assert info.value.field == "identity_public_key"


def test_real_keys_pass_the_point_check() -> None:
    for i in range(200):
        issue_credential(AUTHORITY, CONSORTIUM, "s", raw(site_key(i)), not_before=0, not_after=1)


def test_issue_needs_an_ed25519_authority_key() -> None:
    with pytest.raises(MalformedCredentialError) as info:
        issue_credential(raw(AUTHORITY), CONSORTIUM, "s", raw(site_key(0)),  # type: ignore[arg-type]
                         not_before=0, not_after=1)
    assert info.value.field == "authority_key"


def test_serials_are_random_and_16_bytes() -> None:
    serials = {credential().serial for _ in range(20)}
    assert len(serials) == 20 and all(len(s) == 16 for s in serials)
