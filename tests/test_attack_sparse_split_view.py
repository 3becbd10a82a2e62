"""Split views on a sparse SecAgg+ graph, with no colluder: the attack an independent tester ran.

A malicious server drives the real client state machines of a Harary cohort (active mode, the
library's own n, k, t for a colluding fraction f = 0). Victim v masks with only a set D of t − 1 of
its neighbours: the server withholds the other share boxes addressed to v. It then shows v and D the
survivor set S_v (v alive, v's other neighbours dropped) and everybody else S (the members of D
dropped). Each set is signed by far more than t clients of the cohort, so a consistency check that
counts signatures over the whole cohort passes everywhere: v's holders reveal v's self-mask share,
and the holders of each j in D reveal j's masking-key share, which is every mask on v's input.

Counting, for each owner whose share a client reveals, the signatures of that owner's own holders
(``fedveil.secagg.survivor_checks.check_consistency``) stops it: v's holders are split between the two sets,
and no set reaches t among them. The control test runs the same server against a cohort-wide count
and recovers v's exact input, so the attack is real and the first test can fail.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import fedveil.secagg.client as secagg_client
from fedveil.secagg import ConsistencyCheckError, GraphSpec, SecAggClient, SecAggConfig, SecAggError, plan_threshold
from fedveil.secagg.keys import pairwise_mask_seed, self_mask_prg_seed, survivor_set_payload, verify
from fedveil.secagg.messages import ConsistencyCheckRequest, MaskedInputRequest, ShareKeysRequest, UnmaskingRequest
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.session import Session
from fedveil.secagg.shamir import lagrange_at_zero, limbs_to_bytes, reconstruct
from fedveil.secagg.signature_memo import SignatureMemo

VICTIM = 0
DIM = 8


def split_view_attack(n: int, memo: SignatureMemo | None = None) -> tuple[bool, int]:
    """Run the attack; returns (victim's input recovered exactly, number of unmasking refusals)."""
    plan = plan_threshold(n, "harary", max_corrupt_fraction=0.0)
    k, t = plan.degree, plan.threshold
    ids = [Ed25519PrivateKey.generate() for _ in range(n)]
    cfg = SecAggConfig(num_clients=n, threshold=t, vector_length=DIM, round_id=7, ring_bits=32,
                       graph=GraphSpec("harary", k), active=True,
                       identity_keys=tuple(i.public_key().public_bytes_raw() for i in ids),
                       context=b"split-view", max_corrupt_fraction=0.0, graph_seed=os.urandom(32))
    inputs = {u: np.random.default_rng(u).integers(0, 2**20, DIM, dtype=np.uint32) for u in range(n)}
    clients = {u: SecAggClient(u, cfg, identity_key=ids[u], signature_memo=memo) for u in range(n)}
    for u, client in clients.items():
        client.set_input(inputs[u].copy())
    advertisements = tuple(clients[u].advertise_keys() for u in range(n))
    graph = Session.from_advertisements(cfg, advertisements).graph
    session_id = Session.from_advertisements(cfg, advertisements).session_id
    neighbours = set(graph.neighbors(VICTIM))
    chosen: list[int] = []  # D: t − 1 neighbours of v, overlapping each other's neighbourhoods least
    while len(chosen) < t - 1:
        chosen.append(min(sorted(neighbours - set(chosen)),
                          key=lambda j: len(set(graph.neighbors(j)) & set(chosen))))
    withheld = set(chosen)

    boxes_to: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    for u in range(n):
        reply = clients[u].handle(ShareKeysRequest(round_id=7, client_id=u, advertisements=advertisements))
        for holder, box in reply.boxes.items():
            boxes_to[holder][u] = box
    masked = {}
    for u in range(n):
        boxes = boxes_to[u] if u != VICTIM else {j: b for j, b in boxes_to[u].items() if j in withheld}
        masked[u] = clients[u].handle(MaskedInputRequest(round_id=7, client_id=u, boxes=boxes)).vector.copy()

    everyone = set(range(n))
    shown_to_victim_side = sorted(everyone - (neighbours - withheld))
    shown_to_the_rest = sorted(everyone - withheld)
    shown = {u: shown_to_victim_side if u in withheld | {VICTIM} else shown_to_the_rest for u in range(n)}
    signatures: dict[tuple[int, ...], dict[int, bytes]] = {}
    for u in range(n):
        request = ConsistencyCheckRequest(round_id=7, client_id=u, survivors=np.array(shown[u], np.uint32))
        signatures.setdefault(tuple(shown[u]), {})[u] = clients[u].handle(request).signature

    self_mask: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    mask_key: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    refusals = 0
    for u in range(n):
        survivors = shown[u]
        dropped = sorted(everyone - set(survivors) - {u})
        try:
            reply = clients[u].handle(UnmaskingRequest(
                round_id=7, client_id=u, survivors=np.array(survivors, np.uint32),
                dropped=np.array(dropped, np.uint32), signatures=signatures[tuple(survivors)]))
        except ConsistencyCheckError:
            refusals += 1
            continue
        for owner, row in zip(reply.self_mask_owners.tolist(), reply.self_mask_shares, strict=True):
            self_mask.setdefault(owner, ([], []))[0].append(u + 1)
            self_mask[owner][1].append(row)
        for owner, row in zip(reply.mask_key_owners.tolist(), reply.mask_key_shares, strict=True):
            mask_key.setdefault(owner, ([], []))[0].append(u + 1)
            mask_key[owner][1].append(row)

    def secret(table: dict[int, tuple[list[int], list[np.ndarray]]], owner: int) -> bytes:
        xs, rows = table.get(owner, ([], []))
        if len(xs) < t:
            raise SecAggError(f"only {len(xs)} shares of client {owner}")
        points = np.asarray(xs[:t])
        return limbs_to_bytes(reconstruct(points, np.stack(rows[:t]), lagrange_at_zero(points)))

    try:
        self_mask_seed = secret(self_mask, VICTIM)
        keys = {j: X25519PrivateKey.from_private_bytes(secret(mask_key, j)) for j in withheld}
    except SecAggError:
        return False, refusals
    recovered = masked[VICTIM].copy()
    add, subtract = [], [self_mask_prg_seed(self_mask_seed, VICTIM, session_id)]
    for j, key in keys.items():
        seed = pairwise_mask_seed(key, advertisements[VICTIM].mask_public, j, VICTIM, session_id)
        (subtract if VICTIM < j else add).append(seed)
    MaskExpander(DIM, cfg.ring.dtype).apply(recovered, add=add, subtract=subtract)
    cfg.ring.reduce(recovered)
    return bool(np.array_equal(recovered, inputs[VICTIM])), refusals


def cohort_wide_count(ctx: object, survivors: frozenset[int], dropped: frozenset[int],
                      signatures: dict[int, bytes]) -> None:
    """The check as it was: t valid signatures on the set from anywhere in the cohort."""
    cfg, session = ctx.config, ctx.session  # type: ignore[attr-defined]
    if ctx.signed_survivors != survivors:  # type: ignore[attr-defined]
        raise ConsistencyCheckError("another set")
    payload = survivor_set_payload(session.session_id, survivors)
    valid = 0
    for signer, signature in signatures.items():
        try:
            verify(cfg.identity_keys[signer], signature, payload, what="survivor set")
        except SecAggError:
            continue
        valid += 1
    if valid < cfg.threshold:
        raise ConsistencyCheckError("too few")


@pytest.mark.slow
@pytest.mark.parametrize("n", [50, 100])
def test_per_owner_quorums_stop_a_split_view_without_colluders(n: int) -> None:
    recovered, refusals = split_view_attack(n)
    assert not recovered
    assert refusals > 0  # the victim's holders saw too few of their fellow holders sign their set


@pytest.mark.slow
def test_sites_sharing_one_signature_memo_stop_the_split_view_too() -> None:
    """A simulation's sites share their Ed25519 verdicts (fedveil.secagg.signature_memo); a signature
    on one survivor set says nothing about the other set, so the split view still fails."""
    memo = SignatureMemo()
    recovered, refusals = split_view_attack(50, memo)
    assert not recovered and refusals > 0
    assert memo.reused > 0  # the sites did share verdicts


@pytest.mark.slow
def test_the_same_server_recovers_the_input_against_a_cohort_wide_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secagg_client, "check_consistency", cohort_wide_count)
    recovered, refusals = split_view_attack(50)
    assert recovered and refusals == 0
