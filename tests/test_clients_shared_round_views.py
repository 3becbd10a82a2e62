"""What the sites of one process share of a round, and what each keeps for itself.

A simulation worker hosts hundreds of sites; each used to keep its own n-sized copy of the cohort's
identity keys, members, advertisement table and credential checks. They now share one copy when
the values are equal. The attacker here is a server that sends one site a view different from the
others': that site must still get exactly the view it received, never another site's.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.clients import admission
from fedveil.clients.participation import kept_start
from fedveil.clients.policy import PolicyViolation, SitePolicy
from fedveil.clients.secagg_driver import secagg_config
from fedveil.clients.shared_round_views import shared_value
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import InvalidCredentialSignature
from fedveil.secagg.identity import SiteCredential, issue_credential, verify_roster
from fedveil.secagg.messages import AdvertiseKeys
from fedveil.secagg.session import Session

NOW = 1_700_000_000
N = 6


def key(i: int, salt: bytes = b"") -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"site %d" % i + salt).digest())


def public(i: int, salt: bytes = b"") -> bytes:
    return key(i, salt).public_key().public_bytes_raw()


def start_for(client_id: int, *, substitute: int | None = None,
              credentials: list[bytes] | None = None) -> pb.RoundStart:
    keys = [public(i, b"x" if i == substitute else b"") for i in range(N)]
    return pb.RoundStart(
        round=2, round_nonce=b"\x05" * 16, client_id=client_id,
        encoding=pb.EncodingParams(ring_bits=32, dimension=10),
        secagg=pb.SecAggParams(graph="complete", threshold=4, cohort_size=N, round_id=41, context=b"run",
                               active_adversary=True, identity_keys=keys, identity_credentials=credentials or [],
                               max_corrupt_fraction=0.2),
        training=pb.TrainingParams(seed=3),
    )


def test_equal_values_come_back_as_one_object_and_different_ones_stay_apart() -> None:
    first = shared_value(tuple(bytes([i]) * 32 for i in range(4)))
    again = shared_value(tuple(bytes([i]) * 32 for i in range(4)))
    assert again is first
    other = shared_value(tuple(bytes([i + 1]) * 32 for i in range(4)))
    assert other is not first and other != first
    members = shared_value(frozenset(range(100, 150)))
    assert shared_value(frozenset(range(100, 150))) is members


def test_sites_with_the_same_roster_share_it_and_a_site_sent_another_roster_keeps_its_own() -> None:
    configs = [secagg_config(start_for(i)) for i in range(3)]
    assert configs[0].identity_keys is configs[1].identity_keys is configs[2].identity_keys
    tampered = secagg_config(start_for(4, substitute=2))  # the server swapped member 2's key for site 4
    assert tampered.identity_keys is not None and configs[0].identity_keys is not None
    assert tampered.identity_keys[2] == public(2, b"x") != configs[0].identity_keys[2]
    assert configs[0].identity_keys[2] == public(2)  # the others' view is untouched


def advertisements(salt: bytes = b"") -> tuple[AdvertiseKeys, ...]:
    out = []
    for i in range(N):
        share = hashlib.sha256(b"share %d" % i + salt).digest()
        mask = hashlib.sha256(b"mask %d" % i + salt).digest()
        out.append(AdvertiseKeys(7, i, share, mask, b""))
    return tuple(out)


def test_a_session_is_shared_for_the_same_advertisement_objects_only() -> None:
    config = SecAggConfig(num_clients=N, threshold=4, vector_length=10, round_id=7)
    received = advertisements()
    session = Session.shared(config, received)
    assert Session.shared(config, received) is session
    assert session.session_id == Session.from_advertisements(config, received).session_id
    assert list(session.advertisements) == list(range(N))
    # equal content in other objects (another parse, as another site's bytes would give): its own session
    assert Session.shared(config, advertisements()) is not session
    # a site sent a substituted key: its own session, with another id (an abort, never a shared view)
    swapped = received[:3] + advertisements(b"server")[3:4] + received[4:]
    assert Session.shared(config, swapped).session_id != session.session_id
    assert Session.shared(config, swapped).advertisements[3] is swapped[3]


def test_the_kept_start_drops_the_credentials_and_leaves_the_received_message_alone() -> None:
    creds = [bytes([i]) * 170 for i in range(N)]
    received = start_for(1, credentials=creds)
    before = received.SerializeToString()
    kept = kept_start(received)
    assert received.SerializeToString() == before  # an in-process server may share this very object
    assert len(kept.secagg.identity_credentials) == 0
    expected = pb.RoundStart.FromString(before)
    expected.secagg.ClearField("identity_credentials")
    assert kept == expected
    assert secagg_config(kept) == secagg_config(received)
    bare = start_for(1)
    assert kept_start(bare) is bare


def test_a_shared_credential_cache_never_vouches_across_authorities() -> None:
    """Two sites of one process trust different authorities and share one cache: the server shows
    the second site a cohort vouched for by the first site's authority only."""
    authority_a, authority_b = key(100), key(200)
    cohort = [issue_credential(authority_a, "c", f"site-{i}", public(i), not_before=NOW - 10, not_after=NOW + 10)
              for i in range(3)]
    shared: set[bytes] = set()
    verify_roster(authority_a.public_key(), cohort, consortium="c", now=NOW, revocations=None, verified=shared)
    assert len(shared) == 3
    with pytest.raises(InvalidCredentialSignature, match=r"credentials\[0\]"):
        verify_roster(authority_b.public_key(), cohort, consortium="c", now=NOW, revocations=None, verified=shared)
    assert len(shared) == 3  # nothing was added for authority B


def test_sites_given_one_cache_share_it_and_others_keep_their_own() -> None:
    import torch

    from fedveil.clients.options import ClientOptions
    from fedveil.clients.session import Federation

    class NoTransport:  # the constructor does not call the server
        pass

    shared: set[bytes] = set()
    model = torch.nn.Linear(2, 1)
    trusting = SitePolicy(trust_server=True)
    one = Federation(NoTransport(), "t", model, ClientOptions(seed=1, policy=trusting, verified_credentials=shared))  # type: ignore[arg-type]
    two = Federation(NoTransport(), "t", model, ClientOptions(seed=2, policy=trusting, verified_credentials=shared))  # type: ignore[arg-type]
    alone = Federation(NoTransport(), "t", model, ClientOptions(seed=3, policy=trusting))  # type: ignore[arg-type]
    assert one.verified_credentials is shared and two.verified_credentials is shared
    assert alone.verified_credentials is not shared


def test_a_ray_worker_passes_one_cache_to_all_its_sites() -> None:
    from fedveil.simulation import site_host

    captured: list[tuple[object, object]] = []
    original = site_host.site_options

    def spy(*args: object, **kwargs: object) -> object:
        captured.append((kwargs.get("verified_credentials"), kwargs.get("signature_memo")))
        raise RuntimeError("stop here")

    host = site_host.SiteHost.__new__(site_host.SiteHost)
    host.verified_credentials = set()
    host.signature_memo = site_host.SignatureMemo()
    host.sites = {}
    host.config = host.task = host.policy = None  # type: ignore[assignment]
    host.node_id = ""
    site_host.site_options = spy  # type: ignore[assignment]
    try:
        for name in ("a", "b"):
            host.sites[name] = site_host._Site(site_host.SiteSpec(name, 0, 2), None, None)  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match="stop here"):
                host.run_site(name, b"", "token", site_host.Connection("127.0.0.1:1"))
    finally:
        site_host.site_options = original  # type: ignore[assignment]
    assert captured == [(host.verified_credentials, host.signature_memo)] * 2
    assert all(shared is host.verified_credentials and memo is host.signature_memo for shared, memo in captured)


# --- the cohort-credential verdict a process reuses -------------------------------------------------------


def cohort_start(client_id: int, credentials: list[SiteCredential], *, round_id: int = 41) -> pb.RoundStart:
    return pb.RoundStart(
        round=2, client_id=client_id,
        secagg=pb.SecAggParams(cohort_size=len(credentials), round_id=round_id, active_adversary=True,
                               identity_keys=[c.identity_public_key for c in credentials],
                               identity_credentials=[c.encode() for c in credentials]),
    )


def issued(authority: Ed25519PrivateKey, i: int, *, not_after: int = NOW + 100) -> SiteCredential:
    return issue_credential(authority, "c", f"site-{i}", public(i), not_before=NOW - 100, not_after=not_after)


def policy_of(authority: Ed25519PrivateKey) -> SitePolicy:
    return SitePolicy(authority_public_key=authority.public_key().public_bytes_raw(), consortium="c")


def test_a_reused_cohort_verdict_still_checks_each_sites_own_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    check_identities = admission.check_identities
    full_checks = []
    original = admission._check_cohort

    def counted(*args: object, **kwargs: object) -> admission.CheckedCohort:
        full_checks.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(admission, "_check_cohort", counted)
    authority = key(300)
    cohort = [issued(authority, i) for i in range(4)]
    policy = policy_of(authority)
    for i in range(4):  # every site of the process admits the same bytes
        check_identities(policy, cohort_start(i, cohort), own_name=f"site-{i}", own_key=public(i), now=NOW)
    assert len(full_checks) == 1
    # the server puts site-3 into site-1's slot with the same (checked) bytes: still refused
    with pytest.raises(PolicyViolation, match="slot 1 is not this site's credential"):
        check_identities(policy, cohort_start(1, cohort), own_name="site-3", own_key=public(3), now=NOW)


def test_other_bytes_another_authority_or_a_later_time_get_the_full_check() -> None:
    check_identities = admission.check_identities
    authority, rogue = key(400), key(401)
    cohort = [issued(authority, i, not_after=NOW + 50 if i == 2 else NOW + 100) for i in range(4)]
    policy = policy_of(authority)
    check_identities(policy, cohort_start(0, cohort, round_id=9), own_name="site-0", own_key=public(0), now=NOW)
    # a forged member in otherwise the same roster: not the checked bytes, so verified and refused
    forged = [*cohort[:3], issued(rogue, 3)]
    with pytest.raises(PolicyViolation, match="not vouched for"):
        check_identities(policy, cohort_start(0, forged, round_id=9), own_name="site-0", own_key=public(0), now=NOW)
    # a site pinning another authority, same bytes as the checked roster: refused
    with pytest.raises(PolicyViolation, match="not vouched for"):
        check_identities(policy_of(rogue), cohort_start(0, cohort, round_id=9), own_name="site-0",
                         own_key=public(0), now=NOW)
    # past one member's expiry the verdict no longer holds: checked again, and refused
    with pytest.raises(PolicyViolation, match="expired"):
        check_identities(policy, cohort_start(0, cohort, round_id=9), own_name="site-0", own_key=public(0),
                         now=NOW + 50)
