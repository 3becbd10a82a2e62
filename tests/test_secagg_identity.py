"""Site credentials (fedveil.secagg.identity): every verification failure, rosters, the latest
revocation list, the in-memory authority. Encodings and fuzzed decoders are
tests/test_secagg_identity_encoding.py.

The attacker here is the aggregation server: it wants peers to accept identity keys it made
itself. Each test is one thing it could try.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    AuthorityPublicKey,
    fingerprint,
    issue_credential,
    issue_revocations,
    latest_revocations,
    verify_credential,
    verify_roster,
)
from fedveil.secagg.local_authority import LocalAuthority, local_consortium
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
