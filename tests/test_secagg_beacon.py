"""The cohort's commit-then-reveal graph seed (fedveil.secagg.beacon), tried as an attacker would."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.clients.shared_round_views import commitment_table, graph_seed_of
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg import beacon
from fedveil.secagg.beacon import BeaconCollector, BeaconError
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import RoundAbortedError
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.session import Session


def run_beacon(n: int, round_id: int = 7) -> tuple[dict[int, bytes], dict[int, bytes], bytes]:
    values = {i: beacon.new_contribution() for i in range(n)}
    commitments = {i: beacon.commitment(round_id, i, v) for i, v in values.items()}
    return values, commitments, beacon.combine(round_id, commitments, values)


@given(st.integers(2, 30), st.integers(0, 2**64 - 1))
@settings(max_examples=40, deadline=None)
def test_every_honest_client_derives_the_same_seed_and_the_collector_agrees(n: int, round_id: int) -> None:
    collector = BeaconCollector(round_id, tuple(range(n)), 2)
    values = {i: beacon.new_contribution() for i in range(n)}
    for i, v in values.items():
        collector.receive_commitment(i, beacon.commitment(round_id, i, v))
    listed = collector.close_commit()
    assert listed is not None
    for i, v in values.items():
        beacon.check_commitments(listed, own_id=i, own_commitment=beacon.commitment(round_id, i, v), num_clients=n)
        collector.receive_reveal(i, v)
    seed = collector.close_reveal()
    assert seed is not None and len(seed) == 32
    assert all(beacon.combine(round_id, listed, values) == seed for _ in range(2))


def test_a_reveal_that_does_not_open_its_commitment_is_refused_by_server_and_clients() -> None:
    values, commitments, _ = run_beacon(4)
    forged = dict(values)
    forged[2] = os.urandom(32)  # a colluder tries to change its value after seeing the others
    with pytest.raises(BeaconError, match="does not open"):
        beacon.combine(7, commitments, forged)
    collector = BeaconCollector(7, (0, 1, 2, 3), 2)
    for i in range(4):
        collector.receive_commitment(i, commitments[i])
    collector.close_commit()
    with pytest.raises(BeaconError, match="does not open"):
        collector.receive_reveal(2, forged[2])


def test_a_withheld_reveal_aborts_instead_of_letting_the_server_pick_among_seeds() -> None:
    values, commitments, _ = run_beacon(5)
    partial = {i: v for i, v in values.items() if i != 3}
    with pytest.raises(RoundAbortedError, match="did not reveal"):
        beacon.combine(7, commitments, partial)
    collector = BeaconCollector(7, tuple(range(5)), 2)
    for i in range(5):
        collector.receive_commitment(i, commitments[i])
    collector.close_commit()
    for i, v in partial.items():
        collector.receive_reveal(i, v)
    assert collector.close_reveal() is None and collector.withheld == (3,)


def test_a_client_refuses_a_list_that_drops_or_alters_its_own_commitment() -> None:
    _values, commitments, _ = run_beacon(4)
    mine = commitments[1]
    altered = dict(commitments)
    altered[1] = os.urandom(32)
    with pytest.raises(BeaconError, match="own commitment"):
        beacon.check_commitments(altered, own_id=1, own_commitment=mine, num_clients=4)
    dropped = {i: c for i, c in commitments.items() if i != 1}
    with pytest.raises(BeaconError, match="own commitment"):
        beacon.check_commitments(dropped, own_id=1, own_commitment=mine, num_clients=4)
    outside = dict(commitments)
    outside[9] = os.urandom(32)
    with pytest.raises(BeaconError, match="outside"):
        beacon.check_commitments(outside, own_id=1, own_commitment=mine, num_clients=4)


def test_reveals_from_clients_outside_the_list_are_refused() -> None:
    values, commitments, _ = run_beacon(3)
    extra = dict(values)
    extra[5] = os.urandom(32)
    with pytest.raises(BeaconError, match="not in the commitment list"):
        beacon.combine(7, commitments, extra)


def test_a_commitment_binds_the_round_and_the_client() -> None:
    value = os.urandom(32)
    assert beacon.commitment(1, 2, value) != beacon.commitment(2, 2, value)
    assert beacon.commitment(1, 2, value) != beacon.commitment(1, 3, value)


def test_the_collector_refuses_late_double_and_foreign_messages() -> None:
    collector = BeaconCollector(1, (0, 1, 2), 2)
    c0 = beacon.commitment(1, 0, bytes(32))
    collector.receive_commitment(0, c0)
    with pytest.raises(BeaconError, match="already committed"):
        collector.receive_commitment(0, c0)
    with pytest.raises(BeaconError, match="no commitment expected"):
        collector.receive_commitment(7, c0)
    collector.decline(2)
    assert collector.pending == (1,)
    with pytest.raises(BeaconError, match="cannot decline"):
        collector.decline(0)
    assert collector.close_commit() is None  # one commitment, threshold 2
    assert "threshold" in (collector.abort_reason or "")


def test_the_harary_layout_follows_the_beacon_seed_not_the_advertised_keys() -> None:
    """A colluder that regenerates its keys (grinding the session id) cannot move the layout."""
    from fedveil.secagg.keys import generate_round_keys
    from fedveil.secagg.messages import AdvertiseKeys

    _, _, seed = run_beacon(12)
    config = SecAggConfig(12, 4, 4, round_id=7, graph=GraphSpec("harary", 4), max_corrupt_fraction=0.1, graph_seed=seed)

    def layout() -> tuple[tuple[int, ...], ...]:
        advs = []
        for cid in range(12):
            keys = generate_round_keys()
            advs.append(AdvertiseKeys(7, cid, keys.share_public, keys.mask_public, b""))
        session = Session.from_advertisements(config, advs)
        return tuple(session.graph.neighbors(c) for c in range(12))

    assert layout() == layout()  # fresh keys every time, same neighbours
    other = SecAggConfig(12, 4, 4, round_id=7, graph=GraphSpec("harary", 4), max_corrupt_fraction=0.1,
                         graph_seed=run_beacon(12)[2])
    advs = [AdvertiseKeys(7, c, *(lambda k: (k.share_public, k.mask_public))(generate_round_keys()), b"")
            for c in range(12)]
    first = tuple(Session.from_advertisements(config, advs).graph.neighbors(c) for c in range(12))
    second = tuple(Session.from_advertisements(other, advs).graph.neighbors(c) for c in range(12))
    assert first != second  # a different seed gives a different layout (with overwhelming probability)


def _listed(commitments: dict[int, bytes]) -> bytes:
    return pb.Commitments(round=1, commitments=[pb.SeedCommitment(client_id=c, commitment=v)
                                                for c, v in commitments.items()]).SerializeToString()


def _revealed(values: dict[int, bytes]) -> bytes:
    return pb.Contributions(round=1, reveals=[pb.SeedReveal(client_id=c, contribution=v)
                                              for c, v in values.items()]).SerializeToString()


def test_the_sites_memoized_lists_give_each_site_the_seed_of_the_lists_it_was_shown() -> None:
    """The sites of one process share parsed lists (fedveil.clients.participation); two sites shown
    different lists must still each get the seed of their own, and a false reveal must keep failing."""
    values, commitments, seed = run_beacon(6)
    other_values, other_commitments, other_seed = run_beacon(6)
    assert graph_seed_of(7, _listed(commitments), _revealed(values)) == seed
    assert graph_seed_of(7, _listed(other_commitments), _revealed(other_values)) == other_seed != seed
    assert graph_seed_of(7, _listed(commitments), _revealed(values)) == seed  # from the memo
    table = commitment_table(_listed(commitments))
    assert dict(table.commitments) == commitments and table.members == frozenset(range(6))
    assert not table.listed_twice
    with pytest.raises(TypeError):
        table.commitments[0] = bytes(32)  # type: ignore[index]  # shared between sites: read-only
    false = {**values, 3: bytes(32)}
    for _ in range(2):  # not remembered as a success
        with pytest.raises(BeaconError, match="client 3"):
            graph_seed_of(7, _listed(commitments), _revealed(false))
    twice = _listed(commitments) + _listed({2: bytes(32)})  # a second entry for client 2, appended
    assert commitment_table(twice).listed_twice
