"""The second hop of the active-mode consistency check, driven by a scripted server.

To take one site u's input out of the sum, a server needs u's self mask and every pairwise mask
on u's input. Per-owner quorums (``fedveil.secagg.survivor_checks.check_consistency``) stop it from
getting u's self mask and u's own masking key from two survivor sets. A second route remains in
principle: the self mask from a set on which u is alive, and the masking key of each live partner
x of u from another set on which x is dropped, signed by t of *x's* holders. The per-owner count
over u's holders passes on both sets. So a client that reveals u's self-mask share also requires t
of x's holders to have signed its set, for every live neighbour x of u. Two t-subsets of x's h
holders share more than c of them, so no second set can then release x's key.

The scripted server below runs an honest Harary round up to the signatures, then asks a client
``me`` to unmask with the signatures of x's holders withheld down to t − 1 while every quorum the
per-owner count looks at (``me``'s live holders) stays at t or more. The unmodified client must
refuse, naming x and u. ``owner_quorums_only`` is the check without its second hop; the control
test shows it answers the same request, so the refusal comes from the second hop. The exhaustive
search over Harary layouts that backs the check (``attacks/harary_split_ilp.py``, CHECK=owner and
CHECK=twohop) is recorded in docs/threat-model.md.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedveil.secagg.client as secagg_client
from fedveil.secagg import ConsistencyCheckError, GraphSpec, SecAggClient, SecAggConfig, plan_threshold
from fedveil.secagg.keys import survivor_set_payload, verify
from fedveil.secagg.messages import UnmaskingRequest
from fedveil.secagg.session import Session
from tests.secagg_helpers import run_to_signatures

N = 40
ROUND = 11
DEGREE = 16


def signed_round(seed: int) -> tuple[dict[int, SecAggClient], dict[int, bytes], Session, int]:
    """An honest active Harary round of N clients run up to the survivor-set signatures."""
    plan = plan_threshold(N, "harary", degree=DEGREE)
    rng = np.random.default_rng(seed)
    ids = [Ed25519PrivateKey.generate() for _ in range(N)]
    cfg = SecAggConfig(num_clients=N, threshold=plan.threshold, vector_length=4, round_id=ROUND, ring_bits=32,
                       graph=GraphSpec("harary", plan.degree), active=True,
                       identity_keys=tuple(i.public_key().public_bytes_raw() for i in ids),
                       context=b"second-hop", graph_seed=os.urandom(32))
    clients = {u: SecAggClient(u, cfg, identity_key=ids[u]) for u in range(N)}
    for client in clients.values():
        client.set_input(rng.integers(0, 2**20, 4, dtype=np.uint32))
    ads = tuple(clients[u].advertise_keys() for u in range(N))
    session = Session.from_advertisements(cfg, ads)
    return clients, run_to_signatures(clients, ads, ROUND), session, cfg.threshold


def second_hop_gap(session: Session, t: int) -> tuple[int, int, int, set[int]]:
    """(me, owner u, live neighbour x of u, signers to withhold): x's holders fall to t − 1 signers
    while each of me's holders keeps t. Searched over the layout; every Harary layout of N = 40 has one."""
    graph = session.graph
    for me in range(N):
        mine = set(graph.holders(me))
        for owner in graph.neighbors(me):
            for x in graph.neighbors(owner):
                if x in mine:
                    continue
                # withhold x's holders that are not me's holders, farthest from me first
                spare = [w for w in graph.holders(x) if w not in mine]
                withheld = set(spare[: len(graph.holders(x)) - (t - 1)])
                if len(graph.holders(x)) - len(withheld) != t - 1:
                    continue
                if all(len(set(graph.holders(w)) - withheld) >= t for w in mine):
                    return me, owner, x, withheld
    raise AssertionError("no layout gap found")


def unmask(client: SecAggClient, signatures: dict[int, bytes]) -> object:
    everyone = np.arange(N, dtype=np.uint32)
    return client.handle(UnmaskingRequest(ROUND, client.client_id, everyone, np.zeros(0, np.uint32), signatures))


def owner_quorums_only(ctx: object, survivors: frozenset[int], dropped: frozenset[int],
                       signatures: dict[int, bytes]) -> None:
    """The check without its second hop: t signers among the holders of each of the client's owners."""
    cfg, session = ctx.config, ctx.session  # type: ignore[attr-defined]
    payload = survivor_set_payload(session.session_id, survivors)
    for owner in session.graph.holders(ctx.client_id):  # type: ignore[attr-defined]
        count = 0
        for signer in session.graph.holders(owner):
            if signer in signatures:
                verify(cfg.identity_keys[signer], signatures[signer], payload, what="survivor set")
                count += 1
        if count < cfg.threshold:
            raise ConsistencyCheckError(f"owner {owner}: {count} signers")


@pytest.mark.parametrize("seed", [0, 1])
def test_a_client_refuses_when_a_live_partner_of_an_owner_lacks_its_quorum(seed: int) -> None:
    clients, signatures, session, t = signed_round(seed)
    me, _owner, x, withheld = second_hop_gap(session, t)
    forwarded = {u: s for u, s in signatures.items() if u not in withheld}
    graph = session.graph
    short = {p for p in range(N) if len(set(graph.holders(p)) - withheld) < t}
    assert x in short and not short & set(graph.holders(me))  # only second-hop quorums are short
    with pytest.raises(ConsistencyCheckError) as refused:
        unmask(clients[me], forwarded)
    named = re.search(r"of client (\d+)'s share holders.*live neighbour of client (\d+)", str(refused.value))
    assert named is not None, str(refused.value)
    peer, via = int(named.group(1)), int(named.group(2))
    assert peer in short and via in graph.neighbors(me) and peer in graph.neighbors(via)


def test_with_every_signature_forwarded_the_same_client_answers() -> None:
    clients, signatures, session, t = signed_round(2)
    me, owner, _x, _withheld = second_hop_gap(session, t)
    reply = unmask(clients[me], signatures)
    assert owner in reply.self_mask_owners.tolist()  # type: ignore[attr-defined]


def test_without_the_second_hop_the_same_request_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    clients, signatures, session, t = signed_round(0)
    me, owner, _x, withheld = second_hop_gap(session, t)
    monkeypatch.setattr(secagg_client, "check_consistency", owner_quorums_only)
    reply = unmask(clients[me], {u: s for u, s in signatures.items() if u not in withheld})
    assert owner in reply.self_mask_owners.tolist()  # type: ignore[attr-defined]
