"""Third rerun (against bdc0fc0): per-site rosters make a survivor-set signature count at another slot.

What the proof in docs/threat-model.md ("What a malicious server can unmask") uses: "two sets each
signed by t of one client's h holders share at least 2t - h > c of them". check_consistency counts,
for an owner p, the slots among p's holders whose signature verifies under the identity key that
THIS client's roster puts at that slot. Nothing makes the rosters of different sites agree:
 * the identity keys are not in SecAggConfig.parameters_bytes(), so not in the session id;
 * the survivor-set payload (session id, survivor set) names no signer and no slot;
 * a site's admission (check_identities) checks that every slot carries a valid credential, no
   name/key twice, and its own slot; it cannot see the roster another site was given;
 * R1 verifies the advertisement signatures of the client's own holders only (sparse, seeded).
So a server can give one site a roster in which two slots outside that site's holders trade
identities, and then the signature of honest B (who signed) counts at the slot of honest A (who
did not) among p's holders, while every other site sees the true roster: same session id, same
boxes, same graph.

The demo drives UNMODIFIED SecAggClients (active mode, n = 20, Harary k = 10, the library's t = 9
for f = 1/3): viewer w at position 0, owner p at position 5 (a neighbour of w), the occupants of
positions 1, 6 and 10 do not sign the survivor set (10 is in p's holders, outside w's; 13 is outside
both). With the true roster w must refuse (8 of p's holders signed); with a roster that swaps the
identities at positions 10 and 13 it reveals, although only 8 of p's real holders signed.
Token mode (no aiming needed): a colluder that never advertises lends its identity to slot y (a
holder of both w and p that did not sign) in w's roster only; it signs y's advertisement for w and the
survivor set, so y's slot is valid in w's eyes whatever y signed.
Rosters are fixed in RoundStart, before the commit-then-reveal layout: this demo picks the swap
after seeing the layout, which a real server cannot (see attacks/README.md for what that leaves).

Usage: roster_relabel_real.py
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg import threshold as T
from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    ShareKeysRequest,
    UnmaskingRequest,
)
from fedveil.secagg.session import Session

F = 1 / 3
N, K = 20, 10


def play(relabel: bool, seed: int, token: bool = False) -> str:
    h, c = T.cohort_bound(N, K, F)
    t = T.min_threshold(h, c)
    rng = np.random.default_rng(seed)
    ids = [Ed25519PrivateKey.generate() for _ in range(N)]
    true_keys = tuple(i.public_key().public_bytes_raw() for i in ids)
    base = SecAggConfig(num_clients=N, threshold=t, vector_length=4, round_id=3, ring_bits=32,
                        graph=GraphSpec("harary", K), active=True, identity_keys=true_keys, context=b"relabel",
                        max_corrupt_fraction=F, graph_seed=os.urandom(32))
    # the layout is known once the seed is (here: to pick the demo's positions)
    layout = Session.from_advertisements(base, [SecAggClient(u, base, identity_key=ids[u]).advertise_keys()
                                                for u in range(N)]).graph.layout
    order = layout._order  # position -> client id

    def at(pos: int) -> int:
        return order[pos % N]

    w, p, a, b = at(0), at(5), at(10), at(13)
    non_signers = {at(1), at(6), a}
    keys_w = list(true_keys)
    q = at(-3)  # token mode: a colluder that never advertises lends its identity to slot y
    y = at(1)   # a holder of w and of p that does not sign
    if relabel and not token:
        keys_w[a], keys_w[b] = true_keys[b], true_keys[a]
    if token:
        keys_w[y], keys_w[q] = true_keys[q], true_keys[y]
    cfg_w = dataclasses.replace(base, identity_keys=tuple(keys_w))
    clients = {u: SecAggClient(u, cfg_w if u == w else base, identity_key=ids[u]) for u in range(N)}
    for u in range(N):
        clients[u].set_input(rng.integers(0, 2**16, 4, dtype=np.uint32))
    advs = tuple(clients[u].advertise_keys() for u in range(N) if not (token and u == q))
    advs_w = advs
    if token:  # the colluder signs y's advertisement under its own identity key for w's roster
        from fedveil.secagg.keys import advertisement_payload, sign

        def forged(adv: AdvertiseKeys) -> AdvertiseKeys:
            payload = advertisement_payload(3, base.parameters_bytes(), adv.client_id, adv.share_public,
                                            adv.mask_public)
            return dataclasses.replace(adv, signature=sign(ids[q], payload))

        advs_w = tuple(forged(adv) if adv.client_id == y else adv for adv in advs)
    sids = {Session.from_advertisements(cfg, ad).session_id for cfg, ad in ((base, advs), (cfg_w, advs_w))}
    live = [u for u in range(N) if not (token and u == q)]
    boxes_to: dict[int, dict[int, bytes]] = {u: {} for u in range(N)}
    for u in live:
        resp = clients[u].handle(ShareKeysRequest(round_id=3, client_id=u, advertisements=advs_w if u == w else advs))
        for holder, box in resp.boxes.items():
            boxes_to[holder][u] = box
    for u in live:
        clients[u].handle(MaskedInputRequest(round_id=3, client_id=u, boxes=boxes_to[u]))
    survivors = np.array(live, dtype=np.uint32)
    sigs: dict[int, bytes] = {}
    for u in live:
        if u not in non_signers:
            sigs[u] = clients[u].handle(ConsistencyCheckRequest(round_id=3, client_id=u, survivors=survivors)).signature
    shown = dict(sigs)
    if relabel:  # w's roster puts b's identity at a's slot: b's signature is shown as a's
        shown.pop(b, None)
        shown[a] = sigs[b]
    if token:  # the colluder's signature on the survivor set, at y's slot in w's roster
        from fedveil.secagg.keys import sign, survivor_set_payload
        shown[y] = sign(ids[q], survivor_set_payload(next(iter(sids)), frozenset(live)))
    real_p = sum(1 for x in layout.holders(p) if x in sigs)
    head = (f"{'token' if token else f'relabel={relabel}'}: one session id for both rosters: {len(sids) == 1}; t={t}; "
            f"real signers among owner p's {len(layout.holders(p))} holders: {real_p}; ")
    try:
        resp = clients[w].handle(UnmaskingRequest(round_id=3, client_id=w, survivors=survivors,
                                                  dropped=np.zeros(0, np.uint32), signatures=shown))
    except Exception as err:  # the client's refusal
        return head + f"w REFUSED: {str(err)[:150]}"
    return head + (f"w REVEALED {len(resp.self_mask_owners)} self-mask shares "
                   f"(owner p included: {p in resp.self_mask_owners.tolist()})")


if __name__ == "__main__":
    for relabel in (False, True):
        print(play(relabel, 1), flush=True)
    print(play(False, 1, token=True), flush=True)
