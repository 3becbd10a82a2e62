"""A server gives one site a differently ordered identity roster (the third independent rerun).

A survivor-set signature names no slot, and a site counts the signers among an owner's holders by
the identity keys *its* roster puts at those slots. A server that swapped two vouched identities in
one viewer's roster, at slots outside the viewer's own holders, made an honest B's signature count
at honest A's slot: the viewer revealed an owner's self-mask share although only t − 1 of the owner's
real holders had signed. The roster is now part of the secure-aggregation parameters, so a relabelled
roster is another session: the viewer's holders' key advertisements no longer verify and it refuses
before sending any share. The control puts back the former parameters (no roster) and shows the same
server succeeding, so the first test can fail.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg import SecAggError
from fedveil.secagg import threshold as T
from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.messages import UnmaskingRequest
from fedveil.secagg.session import Session
from tests.secagg_helpers import run_to_signatures

N, K, F, ROUND = 20, 10, 1 / 3, 3


def relabelled_round(seed: int) -> tuple[bool, bool]:
    """(the viewer's session id equals the others', the viewer revealed the owner's self-mask share)."""
    h, c = T.cohort_bound(N, K, F)
    t = T.min_threshold(h, c)
    ids = [Ed25519PrivateKey.generate() for _ in range(N)]
    keys = tuple(i.public_key().public_bytes_raw() for i in ids)
    base = SecAggConfig(num_clients=N, threshold=t, vector_length=4, round_id=ROUND, ring_bits=32,
                        graph=GraphSpec("harary", K), active=True, identity_keys=keys, context=b"relabel",
                        max_corrupt_fraction=F, graph_seed=os.urandom(32))
    layout = Session.from_advertisements(
        base, [SecAggClient(u, base, identity_key=ids[u]).advertise_keys() for u in range(N)]).graph.layout
    order = layout._order  # ring position -> client id

    def at(position: int) -> int:
        return int(order[position % N])

    holders = {u: set(layout.holders(u)) for u in range(N)}
    # The viewer at position 0, the owner at 5 (a neighbour); a at 10 is the owner's holder outside the
    # viewer's, b at 13 is outside both. With the clients at 1, 6 and 10 silent, the owner has t − 1
    # real signers and every other quorum the viewer checks still has t.
    viewer, owner, a, b = at(0), at(5), at(10), at(13)
    silent = {at(1), at(6), a}
    swapped = list(keys)
    swapped[a], swapped[b] = keys[b], keys[a]
    viewer_cfg = dataclasses.replace(base, identity_keys=tuple(swapped))
    clients = {u: SecAggClient(u, viewer_cfg if u == viewer else base, identity_key=ids[u]) for u in range(N)}
    rng = np.random.default_rng(seed)
    for client in clients.values():
        client.set_input(rng.integers(0, 2**16, 4, dtype=np.uint32))
    ads = tuple(clients[u].advertise_keys() for u in range(N))
    same_session = Session.from_advertisements(viewer_cfg, ads).session_id == Session.from_advertisements(
        base, ads).session_id
    try:
        signatures = run_to_signatures(clients, ads, ROUND, signers=set(range(N)) - silent)
        everyone = np.arange(N, dtype=np.uint32)
        assert sum(1 for u in holders[owner] if u in signatures) == t - 1  # one real signer short
        shown = {u: s for u, s in signatures.items() if u != b}
        shown[a] = signatures[b]  # in the viewer's roster b's identity sits at a's slot
        reply = clients[viewer].handle(UnmaskingRequest(ROUND, viewer, everyone, np.zeros(0, np.uint32), shown))
    except SecAggError:
        return same_session, False
    return same_session, owner in reply.self_mask_owners.tolist()


def roster_free_parameters(self: SecAggConfig) -> bytes:
    """The parameters as they were before the roster was bound into them."""
    graph = self.graph.encode()
    head = struct.pack("<IIIB?H", self.num_clients, self.threshold, self.vector_length, self.ring_bits,
                       self.active, len(graph))
    return (head + graph + struct.pack("<H", len(self.context)) + self.context
            + struct.pack("<d", self.max_corrupt_fraction)
            + struct.pack("<B", len(self.graph_seed)) + self.graph_seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_relabelled_roster_is_another_session_and_the_viewer_reveals_nothing(seed: int) -> None:
    same_session, revealed = relabelled_round(seed)
    assert not same_session and not revealed


def test_without_the_roster_in_the_parameters_the_relabelling_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SecAggConfig, "parameters_bytes", roster_free_parameters)
    same_session, revealed = relabelled_round(0)
    assert same_session and revealed
