"""The authority's signed roster: one signature vouches for many credentials, checked once per site.

What a deviating server would try: hand a site a roster it made itself, edit an entry of a real one
(another key under a listed name), replay a roster of another consortium, or count on a listed
credential outliving its revocation or validity. Each must fail; and a roster must really spare the
site the per-credential signature checks in a round, or it is only a file.
"""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.clients.policy import PolicyError, SitePolicy
from fedveil.secagg import identity
from fedveil.secagg.errors import (
    CredentialExpired,
    CredentialRevoked,
    InvalidCredentialSignature,
    InvalidSignedRoster,
    MalformedCredentialError,
    WrongConsortium,
)
from fedveil.secagg.identity import SiteCredential, decode_credential, issue_credential, verified_mark, verify_roster
from fedveil.secagg.local_authority import LocalAuthority
from fedveil.secagg.signed_roster import SignedRoster, issue_signed_roster, verify_signed_roster

NOW = 1_800_000_000


def consortium(n: int = 4, name: str = "eu-cardio") -> tuple[LocalAuthority, list[SiteCredential]]:
    authority = LocalAuthority(name, seed=bytes(32))
    return authority, [authority.identity(f"site-{i}", now=NOW)[1] for i in range(n)]


def test_a_roster_round_trips_and_marks_exactly_its_credentials() -> None:
    authority, credentials = consortium()
    roster = authority.signed_roster(issued_at=NOW, version=7)
    decoded = SignedRoster.decode(roster.encode())
    assert decoded == roster and decoded.version == 7 and len(decoded.credentials) == 4
    marks = verify_signed_roster(authority.public_key, decoded, consortium="eu-cardio")
    assert marks == {verified_mark(authority.public_key, c.encode()) for c in credentials}


def test_a_roster_the_server_signed_itself_is_refused() -> None:
    authority, credentials = consortium()
    forged = issue_signed_roster(Ed25519PrivateKey.generate(), "eu-cardio", [], version=1, issued_at=NOW)
    forged = dataclasses.replace(forged, credentials=tuple(c.encode() for c in credentials))
    forged = dataclasses.replace(forged, signature=Ed25519PrivateKey.generate().sign(forged.signed_payload()))
    with pytest.raises(InvalidSignedRoster, match=r"roster\.signature: does not verify"):
        verify_signed_roster(authority.public_key, forged, consortium="eu-cardio")


def test_an_edited_entry_breaks_the_roster_signature() -> None:
    authority, credentials = consortium()
    roster = authority.signed_roster(issued_at=NOW)
    # the server swaps site-1's key for one it holds, keeping the name and the old credential signature
    swapped = dataclasses.replace(credentials[1], identity_public_key=Ed25519PrivateKey.generate().public_key()
                                  .public_bytes_raw())
    entries = list(roster.credentials)
    entries[1] = swapped.encode()
    edited = dataclasses.replace(roster, credentials=tuple(entries))
    with pytest.raises(InvalidSignedRoster):
        verify_signed_roster(authority.public_key, edited, consortium="eu-cardio")


def test_a_roster_of_another_consortium_is_refused() -> None:
    authority, _ = consortium(name="us-onco")
    roster = authority.signed_roster(issued_at=NOW)
    with pytest.raises(WrongConsortium, match=r"roster\.consortium"):
        verify_signed_roster(authority.public_key, roster, consortium="eu-cardio")


def test_the_authority_lists_only_credentials_it_issued_of_its_consortium() -> None:
    authority, credentials = consortium()
    _, theirs = consortium(name="eu-cardio")
    other_key = Ed25519PrivateKey.generate()
    stranger = issue_credential(other_key, "eu-cardio", "site-x", theirs[0].identity_public_key,
                                not_before=NOW, not_after=NOW + 10)
    with pytest.raises(InvalidSignedRoster, match=r"credentials\[1\]\.signature"):
        issue_signed_roster(authority._key, "eu-cardio", [credentials[0], stranger], version=1, issued_at=NOW)
    with pytest.raises(WrongConsortium, match=r"credentials\[0\]\.consortium"):
        issue_signed_roster(authority._key, "us-onco", credentials, version=1, issued_at=NOW)


def test_listed_credentials_are_still_checked_for_revocation_and_validity_each_round() -> None:
    authority, credentials = consortium()
    marks = verify_signed_roster(authority.public_key, authority.signed_roster(issued_at=NOW), consortium="eu-cardio")
    revoked = authority.revoke([credentials[2].serial], issued_at=NOW)
    with pytest.raises(CredentialRevoked, match=r"credentials\[2\]\.serial"):
        verify_roster(authority.public_key, credentials, consortium="eu-cardio", now=NOW, revocations=revoked,
                      verified=set(marks))
    with pytest.raises(CredentialExpired):
        verify_roster(authority.public_key, credentials, consortium="eu-cardio", now=NOW + 8 * 86400,
                      revocations=None, verified=set(marks))


def test_a_credential_the_roster_does_not_list_needs_its_own_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    authority, credentials = consortium()
    marks = verify_signed_roster(authority.public_key, authority.signed_roster(issued_at=NOW), consortium="eu-cardio")
    late = authority.identity("site-late", now=NOW)[1]
    forged = dataclasses.replace(late, site_name="site-forged")  # the server renames it; the signature no longer fits
    with pytest.raises(InvalidCredentialSignature, match=r"credentials\[4\]\.signature"):
        verify_roster(authority.public_key, [*credentials, forged], consortium="eu-cardio", now=NOW,
                      revocations=None, verified=set(marks))
    # the listed ones cost no signature check at all; the unlisted one costs its own
    checked: list[int] = []
    real = identity.valid_signatures

    def counting(items):  # type: ignore[no-untyped-def]
        checked.append(len(items))
        return real(items)

    monkeypatch.setattr(identity, "valid_signatures", counting)
    monkeypatch.setattr(identity.AuthorityPublicKey, "verifies", lambda *a: pytest.fail("a listed credential's "
                                                                                         "signature was checked"))
    verify_roster(authority.public_key, credentials, consortium="eu-cardio", now=NOW, revocations=None,
                  verified=set(marks))
    assert checked == [0]
    monkeypatch.undo()
    verify_roster(authority.public_key, [*credentials, late], consortium="eu-cardio", now=NOW, revocations=None,
                  verified=set(marks))


def test_a_site_policy_checks_its_roster_against_its_own_authority() -> None:
    authority, _ = consortium()
    roster = authority.signed_roster(issued_at=NOW)
    policy = SitePolicy(authority_public_key=authority.public_key.raw, consortium="eu-cardio", roster=roster)
    assert len(policy.roster_marks) == 4
    impostor = LocalAuthority("eu-cardio")
    with pytest.raises(PolicyError, match="roster: not vouched for by this site's authority"):
        SitePolicy(authority_public_key=impostor.public_key.raw, consortium="eu-cardio", roster=roster)
    with pytest.raises(PolicyError, match="roster: a signed roster needs the authority"):
        SitePolicy(trust_server=True, roster=roster)
    # replacing any other setting keeps the checked roster; the marks are never a setting of their own
    assert dataclasses.replace(policy, min_cohort=5).roster_marks == policy.roster_marks
    with pytest.raises(ValueError, match="roster_marks"):
        dataclasses.replace(policy, roster_marks=frozenset())


def test_the_decoder_names_the_field_of_a_truncated_or_padded_roster() -> None:
    authority, _ = consortium(2)
    encoding = authority.signed_roster(issued_at=NOW).encode()
    for cut in range(len(encoding)):
        with pytest.raises(MalformedCredentialError) as err:
            SignedRoster.decode(encoding[:cut])
        assert err.value.field
    with pytest.raises(MalformedCredentialError, match="encoding: 1 trailing bytes"):
        SignedRoster.decode(encoding + b"\x00")
    huge_count = bytearray(encoding)
    offset = 4 + 2 + 2 + len("eu-cardio") + 16
    huge_count[offset:offset + 4] = (1 << 31).to_bytes(4, "little")
    with pytest.raises(MalformedCredentialError, match="count"):
        SignedRoster.decode(bytes(huge_count))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_decode_to_anything_but_a_roster_or_a_named_error(data: bytes) -> None:
    try:
        roster = SignedRoster.decode(data)
    except MalformedCredentialError as err:
        assert err.field
    else:
        assert roster.encode() == data


def test_an_entry_that_is_no_credential_is_refused_by_index() -> None:
    authority, credentials = consortium(2)
    key = authority._key
    unsigned = SignedRoster("eu-cardio", 1, NOW, (credentials[0].encode(), b"junk"), bytes(64))
    roster = dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_payload()))
    with pytest.raises(MalformedCredentialError, match=r"roster\.credentials\[1\]\."):
        verify_signed_roster(authority.public_key, roster, consortium="eu-cardio")
    assert decode_credential(credentials[0].encode()) == credentials[0]


def test_forget_checks_makes_the_next_roster_check_verify_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark times each site's own checks: after forget_checks nothing is served from the memos."""
    from fedveil.secagg.identity import AuthorityPublicKey
    from fedveil.secagg.keys import ed25519_public_key_problem
    from fedveil.secagg.signed_roster import forget_checks

    authority, _ = consortium()
    roster = authority.signed_roster(issued_at=NOW, version=3)
    calls: list[bytes] = []
    real = AuthorityPublicKey.verifies

    def counted(self: AuthorityPublicKey, signature: bytes, payload: bytes) -> bool:
        calls.append(signature)
        return real(self, signature, payload)

    monkeypatch.setattr(AuthorityPublicKey, "verifies", counted)
    forget_checks()
    first = verify_signed_roster(authority.public_key, roster, consortium="eu-cardio")
    assert verify_signed_roster(authority.public_key, roster, consortium="eu-cardio") == first
    assert len(calls) == 1  # the second check came from the memo
    assert decode_credential.cache_info().currsize > 0 and ed25519_public_key_problem.cache_info().currsize > 0
    forget_checks()
    assert decode_credential.cache_info().currsize == 0 and ed25519_public_key_problem.cache_info().currsize == 0
    assert verify_signed_roster(authority.public_key, roster, consortium="eu-cardio") == first
    assert len(calls) == 2
