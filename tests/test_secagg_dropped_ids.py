"""The dropped ids of an unmasking request: every one must have advertised keys in the session.

An honest server lists as dropped the clients that sent their shares but no masked input (U2 \\ U3),
all of them advertisers. The client never range-checked them (review finding 6), and the active-mode
quorum plan sized its arrays by the largest id it saw: one dropped id of 2^32 − 1 in an otherwise
honest request asked a site for 4 GiB of booleans and 32 GiB of int64 counts (a MemoryError, or the
OOM killer, hitting every site in the process). Now any other id is refused with an
:class:`UnmaskingRefusedError` naming it, before anything is sized by it, and the client aborts.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg import SecAggClient, SecAggConfig
from fedveil.secagg.errors import UnmaskingRefusedError
from fedveil.secagg.graph import GraphSpec, build_graph
from fedveil.secagg.messages import UnmaskingRequest, UnmaskingResponse
from fedveil.secagg.survivor_checks import quorum_plan
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, Consortium, TamperingServer, job_config, run_job, turnkey
from tests.secagg_helpers import ManualRound, random_inputs, run_to_signatures

torch.set_num_threads(1)
ROUND = 7


def active_round(n: int = 5, skip_advertising: frozenset[int] = frozenset()
                 ) -> tuple[dict[int, SecAggClient], dict[int, bytes], np.ndarray]:
    """Active clients driven honestly to the unmasking stage: the clients, the survivor-set signatures,
    and the survivors (every advertiser). Clients in ``skip_advertising`` never advertise keys."""
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    config = SecAggConfig(num_clients=n, threshold=4, vector_length=8, round_id=ROUND, active=True,
                          identity_keys=tuple(k.public_key().public_bytes_raw() for k in keys))
    inputs = random_inputs(config)
    clients = {c: SecAggClient(c, config, identity_key=keys[c]) for c in range(n) if c not in skip_advertising}
    for c, client in clients.items():
        client.set_input(inputs[c])
    advertisements = tuple(client.advertise_keys() for client in clients.values())
    signatures = run_to_signatures(clients, advertisements, ROUND)
    return clients, signatures, np.array(sorted(clients), dtype=np.uint32)


def _request(client: int, survivors: np.ndarray, dropped: list[int], signatures: dict[int, bytes]) -> UnmaskingRequest:
    return UnmaskingRequest(ROUND, client, survivors, np.array(dropped, dtype=np.uint32), signatures)


@pytest.mark.parametrize("dropped_id", [2**32 - 1, 2**26, 5, 6])
def test_a_dropped_id_outside_the_cohort_is_refused_before_anything_is_sized_by_it(dropped_id: int) -> None:
    """The review's repro (dropped_id_memory.py): 2^26 took 0.5 GiB and 1.1 s, 2^32 − 1 a MemoryError
    under a 3 GiB limit. Now: a refusal naming the id, in well under a MiB."""
    clients, signatures, survivors = active_round()
    honest = clients[1].handle(_request(1, survivors, [], signatures))
    assert isinstance(honest, UnmaskingResponse) and len(honest.self_mask_owners) == 5
    tracemalloc.start()
    try:
        with pytest.raises(UnmaskingRefusedError, match=rf"names dropped client {dropped_id}, outside the "
                                                        r"cohort 0\.\.4"):
            clients[0].handle(_request(0, survivors, [dropped_id], signatures))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert clients[0].aborted


def test_a_dropped_id_inside_the_cohort_that_never_advertised_is_refused() -> None:
    """Slot 4 is a cohort member that never advertised keys: no client holds a share of it, and an
    honest server never lists it as dropped."""
    clients, signatures, survivors = active_round(5, skip_advertising=frozenset({4}))
    assert survivors.tolist() == [0, 1, 2, 3]
    with pytest.raises(UnmaskingRefusedError, match="names dropped client 4, which did not advertise keys"):
        clients[0].handle(_request(0, survivors, [4], signatures))
    assert clients[0].aborted
    assert isinstance(clients[1].handle(_request(1, survivors, [], signatures)), UnmaskingResponse)


@settings(max_examples=40, deadline=None)
@given(strangers=st.lists(st.integers(0, 2**32 - 1).filter(lambda i: not 0 <= i < 4), min_size=1, max_size=4),
       members=st.lists(st.sampled_from([5, 6]), max_size=2, unique=True), data=st.data())
def test_any_dropped_list_naming_a_non_advertiser_is_refused(strangers: list[int], members: list[int],
                                                              data: st.DataObject) -> None:
    """Passive mode (no quorum plan at all): the honest dropped set {5, 6}, any part of it, mixed with
    any ids that did not advertise (slot 4 of the 7-client cohort never did, and ids from 7 up are
    outside it), is refused naming one of those ids; the honest request alone is answered."""
    config = SecAggConfig(7, 3, 8, round_id=ROUND)
    r = ManualRound(config)
    r.advertise(skip={4})
    out = r.close()
    out = r.step(out)
    out = r.step(out, skip={5, 6})  # 5 and 6 shared their keys but sent no masked input
    honest = out[0]
    assert honest.dropped.tolist() == [5, 6]
    dropped = data.draw(st.permutations(members + strangers))
    evil = dataclasses.replace(honest, dropped=np.array(dropped, dtype=np.uint32))
    with pytest.raises(UnmaskingRefusedError, match="names dropped client") as err:
        r.clients[0].handle(evil)
    named = int(str(err.value).split("names dropped client ")[1].split(",")[0])
    assert named in strangers
    reply = r.clients[1].handle(out[1])
    assert isinstance(reply, UnmaskingResponse) and reply.mask_key_owners.tolist() == [5, 6]


def test_the_quorum_plan_is_sized_by_the_graph_not_by_the_ids_it_is_given() -> None:
    """Defence in depth: called directly with an id beyond every node, the plan allocates by the
    graph's nodes and plans exactly what it plans without that id."""
    n = 20
    graph = build_graph(GraphSpec("harary", 6), n, list(range(n)), b"\x01" * 16)
    survivors = frozenset(range(n - 2))
    signed = frozenset(range(0, n - 2, 2))
    plain = quorum_plan(graph, 3, survivors, frozenset({18, 19}), signed, 4)
    tracemalloc.start()
    try:
        huge = quorum_plan(graph, 3, survivors | {2**32 - 1}, frozenset({18, 19, 2**32 - 2}),
                           signed | {2**32 - 1}, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert huge == plain and peak < 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_site_refuses_an_unmasking_request_with_a_dropped_id_outside_the_cohort(tmp_path: Path) -> None:
    """The review's repro (dropped_id_federation.py) with the id 2^26 (0.5 GiB before the fix): the
    victim used to answer it (or, at 2^32 − 1, raise a MemoryError out of its loop). It now refuses
    naming the id, sends no unmasking shares, and its loop goes on."""
    names = [f"site-{i}" for i in range(4)]
    consortium = Consortium.create(names)
    holder: dict[str, TamperingServer] = {}

    def tamper(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "unmasking":
            resp.unmasking.dropped.append(2**26)
        return resp

    def front(coordinator: object) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, names[0], tamper)  # type: ignore[arg-type]
        return holder["s"]

    summary, results, errors = run_job(tmp_path, job_config(rounds=1, min_clients=3, stage_timeout=3.0,
                                                               cohort_wait=ALL_JOIN_WAIT), synthetic,
                                       [turnkey(synthetic, n, i, consortium) for i, n in enumerate(names)],
                                       service=front)
    assert errors == []
    server = holder["s"]
    assert server.sent.named("submit_masked_input")  # it took part up to the unmasking request
    assert not server.sent.named("unmask")
    victim, _history = results[0]
    assert [o.outcome for o in victim.history] == ["dropped"]
    assert "names dropped client 67108864, outside the cohort" in victim.history[0].reason
    assert summary.completed_rounds == 1  # the others' round was released without the victim's shares
