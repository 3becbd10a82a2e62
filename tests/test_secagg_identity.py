"""Site credentials (fedveil.secagg.identity): encodings, fuzzed decoders, every verification failure.

The attacker here is the aggregation server: it wants peers to accept identity keys it made
itself. Each test is one thing it could try.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg.errors import (
    ConfigError,
    CredentialError,
    CredentialExpired,
    CredentialMismatch,
    CredentialNotYetValid,
    CredentialRevoked,
    DuplicateRosterEntry,
    IdentityError,
    InvalidCredentialSignature,
    InvalidRevocationList,
    MalformedCredentialError,
    RevocationListConflict,
    SecAggError,
    WrongConsortium,
)
from fedveil.secagg.identity import (
    CREDENTIAL_TAG,
    REVOCATIONS_TAG,
    AuthorityPublicKey,
    RevocationList,
    SiteCredential,
    fingerprint,
    issue_credential,
    issue_revocations,
    latest_revocations,
    verify_credential,
    verify_revocations,
    verify_roster,
)
from fedveil.secagg.local_authority import LocalAuthority, local_consortium

NOW = 1_700_000_000
DAY = 86400
CONSORTIUM = "eu-cardio"
AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PINNED = AuthorityPublicKey.of(AUTHORITY)


def site_key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"site %d" % i).digest())


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def credential(i: int = 0, *, authority: Ed25519PrivateKey = AUTHORITY, consortium: str = CONSORTIUM,
               name: str | None = None, not_before: int = NOW - DAY, not_after: int = NOW + DAY) -> SiteCredential:
    return issue_credential(authority, consortium, name or f"site-{i}", raw(site_key(i)), not_before=not_before,
                            not_after=not_after)


def verify(cred: SiteCredential, **kw: object) -> None:
    args: dict[str, object] = {"consortium": CONSORTIUM, "now": NOW, "revocations": None, **kw}
    verify_credential(PINNED, cred, **args)  # type: ignore[arg-type]


VALID = credential()
VALID_LIST = issue_revocations(AUTHORITY, CONSORTIUM, version=3, issued_at=NOW, revoked=[b"\x01" * 16, b"\x02" * 16])

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
times = st.integers(0, 2**63 - 2)


# --- encodings ------------------------------------------------------------------------------------------------

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


# --- verification: what a malicious server would try ----------------------------------------------------------

def test_a_valid_credential_verifies_with_expected_name_and_key() -> None:
    verify(VALID, expected_name="site-0", expected_key=raw(site_key(0)), revocations=VALID_LIST)


def test_credential_from_an_authority_the_server_made_itself_is_rejected() -> None:
    server_authority = Ed25519PrivateKey.generate()
    forged = credential(5, authority=server_authority)
    with pytest.raises(InvalidCredentialSignature) as info:
        verify(forged)
    assert info.value.field == "signature" and PINNED.fingerprint in str(info.value)


def test_re_signed_credential_with_a_swapped_key_is_rejected() -> None:
    swapped = dataclasses.replace(VALID, identity_public_key=raw(Ed25519PrivateKey.generate()))
    with pytest.raises(InvalidCredentialSignature):
        verify(swapped)


def test_credential_of_another_consortium_is_useless_here() -> None:
    other = credential(consortium="another-federation")
    with pytest.raises(WrongConsortium) as info:
        verify(other)
    assert info.value.field == "consortium"


def test_validity_window_is_half_open() -> None:
    cred = credential(not_before=NOW, not_after=NOW + 10)
    verify(cred, now=NOW)
    verify(cred, now=NOW + 9)
    with pytest.raises(CredentialNotYetValid) as early:
        verify(cred, now=NOW - 1)
    with pytest.raises(CredentialExpired) as late:
        verify(cred, now=NOW + 10)
    assert early.value.field == "not_before" and late.value.field == "not_after"


def test_now_must_be_an_integer() -> None:
    with pytest.raises(ConfigError):
        verify(VALID, now=float(NOW))


def test_revoked_credential_is_rejected() -> None:
    rl = issue_revocations(AUTHORITY, CONSORTIUM, version=1, issued_at=NOW, revoked=[VALID.serial])
    with pytest.raises(CredentialRevoked) as info:
        verify(VALID, revocations=rl)
    assert info.value.field == "serial" and VALID.serial_hex in str(info.value)


def test_revocation_list_signed_by_another_key_is_rejected() -> None:
    # a server that forges an empty list to hide a revocation, or a list that revokes honest sites
    forged = issue_revocations(Ed25519PrivateKey.generate(), CONSORTIUM, version=9, issued_at=NOW, revoked=[])
    with pytest.raises(InvalidRevocationList) as info:
        verify(VALID, revocations=forged)
    assert info.value.field == "revocations.signature"


def test_revocation_list_of_another_consortium_is_rejected() -> None:
    other = issue_revocations(AUTHORITY, "other", version=1, issued_at=NOW, revoked=[])
    with pytest.raises(WrongConsortium) as info:
        verify(VALID, revocations=other)
    assert info.value.field == "revocations.consortium"


def test_name_or_key_other_than_expected_is_a_mismatch() -> None:
    with pytest.raises(CredentialMismatch) as by_name:
        verify(VALID, expected_name="site-1")
    with pytest.raises(CredentialMismatch) as by_key:
        verify(VALID, expected_key=raw(site_key(1)))
    with pytest.raises(CredentialMismatch):
        verify(VALID, expected_key=b"short")
    assert by_name.value.field == "site_name" and by_key.value.field == "identity_public_key"


def test_roster_accepts_distinct_vouched_sites() -> None:
    verify_roster(PINNED, [credential(i) for i in range(5)], consortium=CONSORTIUM, now=NOW, revocations=VALID_LIST)
    verify_roster(PINNED, [], consortium=CONSORTIUM, now=NOW, revocations=None)


def test_roster_with_an_invented_member_names_its_index() -> None:
    roster = [credential(0), credential(1), credential(2, authority=Ed25519PrivateKey.generate()), credential(3)]
    with pytest.raises(InvalidCredentialSignature) as info:
        verify_roster(PINNED, roster, consortium=CONSORTIUM, now=NOW, revocations=None)
    assert info.value.index == 2 and info.value.field == "credentials[2].signature"


def test_roster_with_a_revoked_or_expired_member_names_its_index() -> None:
    roster = [credential(0), credential(1, not_after=NOW)]
    with pytest.raises(CredentialExpired) as info:
        verify_roster(PINNED, roster, consortium=CONSORTIUM, now=NOW, revocations=None)
    assert info.value.index == 1
    rl = issue_revocations(AUTHORITY, CONSORTIUM, version=1, issued_at=NOW, revoked=[roster[0].serial])
    with pytest.raises(CredentialRevoked) as revoked:
        verify_roster(PINNED, roster, consortium=CONSORTIUM, now=NOW, revocations=rl)
    assert revoked.value.index == 0 and revoked.value.field == "credentials[0].serial"


def test_roster_refuses_one_site_in_two_slots() -> None:
    # two authentic credentials of one site (e.g. a re-issued one): its shares would count twice
    roster = [credential(0), credential(1), credential(2, name="site-0")]
    with pytest.raises(DuplicateRosterEntry) as info:
        verify_roster(PINNED, roster, consortium=CONSORTIUM, now=NOW, revocations=None)
    assert info.value.index == 2 and info.value.field == "credentials[2].site_name"
    with pytest.raises(DuplicateRosterEntry):
        verify_roster(PINNED, [VALID, VALID], consortium=CONSORTIUM, now=NOW, revocations=None)


def test_roster_refuses_one_key_under_two_names() -> None:
    twin = issue_credential(AUTHORITY, CONSORTIUM, "site-twin", raw(site_key(1)), not_before=NOW - 1,
                            not_after=NOW + 1)
    with pytest.raises(DuplicateRosterEntry) as info:
        verify_roster(PINNED, [credential(0), credential(1), twin], consortium=CONSORTIUM, now=NOW, revocations=None)
    assert info.value.index == 2 and info.value.field == "credentials[2].identity_public_key"


def test_roster_checks_the_revocation_list_first() -> None:
    forged = issue_revocations(Ed25519PrivateKey.generate(), CONSORTIUM, version=1, issued_at=NOW, revoked=[])
    with pytest.raises(InvalidRevocationList):
        verify_roster(PINNED, [VALID], consortium=CONSORTIUM, now=NOW, revocations=forged)


# --- latest wins ---------------------------------------------------------------------------------------------

def test_latest_revocation_list_wins_in_any_order() -> None:
    v1 = issue_revocations(AUTHORITY, CONSORTIUM, version=1, issued_at=NOW, revoked=[VALID.serial])
    v2 = issue_revocations(AUTHORITY, CONSORTIUM, version=2, issued_at=NOW + 1, revoked=[VALID.serial, b"\x07" * 16])
    assert latest_revocations(PINNED, [v1, v2], consortium=CONSORTIUM) == v2
    # a server that shows an older list cannot roll the site back
    assert latest_revocations(PINNED, [v2, v1, None], consortium=CONSORTIUM) == v2
    assert latest_revocations(PINNED, [v1, v1], consortium=CONSORTIUM) == v1
    assert latest_revocations(PINNED, [None, None], consortium=CONSORTIUM) is None


def test_latest_revocations_rejects_a_forged_newer_list() -> None:
    v1 = issue_revocations(AUTHORITY, CONSORTIUM, version=1, issued_at=NOW, revoked=[VALID.serial])
    forged = issue_revocations(Ed25519PrivateKey.generate(), CONSORTIUM, version=99, issued_at=NOW, revoked=[])
    with pytest.raises(InvalidRevocationList):
        latest_revocations(PINNED, [v1, forged], consortium=CONSORTIUM)


def test_two_lists_with_one_version_and_different_contents_conflict() -> None:
    a = issue_revocations(AUTHORITY, CONSORTIUM, version=4, issued_at=NOW, revoked=[])
    b = issue_revocations(AUTHORITY, CONSORTIUM, version=4, issued_at=NOW, revoked=[VALID.serial])
    with pytest.raises(RevocationListConflict) as info:
        latest_revocations(PINNED, [a, b], consortium=CONSORTIUM)
    assert isinstance(info.value, InvalidRevocationList) and info.value.field == "revocations.version"


# --- errors, fingerprint, in-memory authority ----------------------------------------------------------------

def test_every_error_is_a_secagg_error_with_a_field() -> None:
    for cls in (MalformedCredentialError, InvalidCredentialSignature, CredentialExpired, CredentialNotYetValid,
                CredentialRevoked, WrongConsortium, CredentialMismatch, InvalidRevocationList,
                RevocationListConflict, DuplicateRosterEntry):
        err = cls("some_field", "what went wrong")
        assert isinstance(err, CredentialError) and isinstance(err, IdentityError) and isinstance(err, SecAggError)
        assert err.field == "some_field" and str(err) == "some_field: what went wrong" and err.index is None
    assert issubclass(MalformedCredentialError, ValueError)


def test_fingerprint_is_128_bits_of_sha256_in_groups() -> None:
    key = raw(site_key(0))
    fp = fingerprint(key)
    assert fp.replace(":", "") == hashlib.sha256(key).hexdigest()[:32]
    assert len(fp.split(":")) == 8 and all(len(g) == 4 for g in fp.split(":"))
    assert fingerprint(raw(site_key(1))) != fp
    with pytest.raises(MalformedCredentialError):
        fingerprint(key[:31])


def test_authority_public_key_wraps_every_form() -> None:
    pub = AUTHORITY.public_key()
    assert AuthorityPublicKey.of(pub) == AuthorityPublicKey.of(raw(AUTHORITY)) == PINNED
    assert AuthorityPublicKey.of(PINNED) is PINNED
    verify_credential(pub, VALID, consortium=CONSORTIUM, now=NOW, revocations=None)
    verify_credential(raw(AUTHORITY), VALID, consortium=CONSORTIUM, now=NOW, revocations=None)
    with pytest.raises(MalformedCredentialError):
        AuthorityPublicKey(b"\x00" * 33)
    with pytest.raises(MalformedCredentialError):
        AuthorityPublicKey(bytearray(raw(AUTHORITY)))  # type: ignore[arg-type]


def test_local_authority_enrols_sites_the_roster_check_accepts() -> None:
    pinned, sites = local_consortium("sim", [f"client-{i}" for i in range(4)], now=NOW)
    roster = [cred for _, cred in sites.values()]
    verify_roster(pinned, roster, consortium="sim", now=NOW, revocations=None)
    for name, (identity, cred) in sites.items():
        assert cred.site_name == name and cred.identity_public_key == raw(identity)
    with pytest.raises(CredentialExpired):
        verify_roster(pinned, roster, consortium="sim", now=NOW + 7 * DAY, revocations=None)


def test_local_authority_is_reproducible_with_a_seed_and_random_without() -> None:
    a = local_consortium("sim", ["x", "y"], now=NOW, seed=b"\x05" * 32)
    b = local_consortium("sim", ["x", "y"], now=NOW, seed=b"\x05" * 32)
    c = local_consortium("sim", ["x", "y"], now=NOW)
    assert a[0] == b[0] and a[1]["x"][1] == b[1]["x"][1] and raw(a[1]["y"][0]) == raw(b[1]["y"][0])
    assert c[0] != a[0] and a[1]["x"][1].serial != a[1]["y"][1].serial
    assert raw(a[1]["x"][0]) != raw(a[1]["y"][0])


def test_local_authority_revokes_with_increasing_versions() -> None:
    authority = LocalAuthority("sim", seed=b"\x01" * 32)
    sites = authority.enrol(["a", "b"], now=NOW)
    empty = authority.revocations(issued_at=NOW)
    assert empty.version == 0 and not empty.revoked
    v1 = authority.revoke([sites["a"][1].serial], issued_at=NOW)
    assert v1.version == 1
    with pytest.raises(CredentialRevoked):
        verify_credential(authority.public_key, sites["a"][1], consortium="sim", now=NOW, revocations=v1)
    verify_credential(authority.public_key, sites["b"][1], consortium="sim", now=NOW, revocations=v1)
    assert latest_revocations(authority.public_key, [v1, empty], consortium="sim") == v1
    with pytest.raises(ConfigError):
        authority.enrol(["c", "c"], now=NOW)
