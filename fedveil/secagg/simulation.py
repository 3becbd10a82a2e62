"""Pure in-process round runner: every client and the server, one after another.

Used by ``fedveil bench secagg`` and the tests. Each party's work is timed separately with the
caller's clock, so the figures say what one client and the server would spend on their own
machine; no I/O happens here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import ConfigError, SecAggError, ShareComplaintsError
from fedveil.secagg.messages import AdvertiseKeys, Message, decode_message
from fedveil.secagg.server import AggregationResult, SecAggServer
from fedveil.secagg.share_complaints import ComplaintVerdict, ShareComplaint
from fedveil.secagg.signature_memo import SignatureMemo

DROPOUT_STAGES = ("keys", "shares", "masked", "consistency", "unmask")
"""Where a client can drop: before advertising keys, before sending shares, before sending its
masked input, before signing the survivor set (active mode), before sending unmasking shares."""


@dataclass
class SimulationResult:
    """What one simulated round produced, with per-party timings and upload sizes."""

    config: SecAggConfig
    result: AggregationResult | None
    abort_reason: str | None
    server_s: float
    client_s: dict[int, float]
    upload_bytes: dict[int, int]
    download_bytes: dict[int, int]
    client_errors: dict[int, str] = field(default_factory=dict)
    client_stage_s: dict[str, dict[int, float]] = field(default_factory=dict)
    """Each client's time per stage (``setup``, ``keys``, then the server state it answered)."""
    verdicts: dict[int, tuple[ComplaintVerdict, ...]] = field(default_factory=dict)
    """The server's verdicts on share-box complaints, by complaining holder (none in an honest round)."""
    blamed: frozenset[int] = frozenset()
    """Clients the server proved at fault (:attr:`SecAggServer.blamed`)."""
    misconduct: dict[int, str] = field(default_factory=dict)
    """Clients proven at unmasking to deviate, and how (:attr:`SecAggServer.misconduct`)."""

    @property
    def completed(self) -> bool:
        return self.result is not None

    @property
    def total_s(self) -> float:
        """Server time plus every client's time (the round's CPU cost in one process)."""
        return self.server_s + sum(self.client_s.values())

    def critical_path_s(self, extra_setup_s: Mapping[int, float] | None = None) -> float:
        """The round's time when every client runs on its own machine over a free network: the
        server's time plus, for each stage, the slowest client's time in it (clients work in
        parallel within a stage; a stage cannot start before the previous one closes).
        ``extra_setup_s`` adds per-client work done before the round (encoding, admission)."""
        stages = {name: dict(per_client) for name, per_client in self.client_stage_s.items()}
        setup = stages.setdefault("setup", {})
        for cid, seconds in (extra_setup_s or {}).items():
            setup[cid] = setup.get(cid, 0.0) + seconds
        return self.server_s + sum(max(per_client.values(), default=0.0) for per_client in stages.values())


def _normalize_dropouts(dropouts: Mapping[str, Iterable[int]] | None, n: int) -> dict[str, frozenset[int]]:
    plan: dict[str, frozenset[int]] = {}
    seen: set[int] = set()
    for stage, ids in (dropouts or {}).items():
        if stage not in DROPOUT_STAGES:
            raise ConfigError(f"dropouts: unknown stage {stage!r} (choose from {DROPOUT_STAGES})")
        group = frozenset(int(i) for i in ids)
        if any(not 0 <= i < n for i in group):
            raise ConfigError(f"dropouts[{stage!r}]: client ids must be in 0..{n - 1}")
        if group & seen:
            raise ConfigError(f"dropouts: clients {sorted(group & seen)} drop at more than one stage")
        seen |= group
        plan[stage] = group
    return plan


def run_round(config: SecAggConfig, inputs: Mapping[int, np.ndarray], *,
              dropouts: Mapping[str, Iterable[int]] | None = None,
              seeds: Mapping[int, bytes] | None = None,
              identity_keys: Mapping[int, Ed25519PrivateKey] | None = None,
              wire: bool = False,
              clock: Callable[[], float] = time.perf_counter,
              signature_memo: SignatureMemo | None = None) -> SimulationResult:
    """Run one round with ``inputs`` (client id → ring vector) for clients ``0..n-1``.

    ``dropouts`` maps a stage of :data:`DROPOUT_STAGES` to the clients that stop responding
    there. ``wire=True`` sends every message through ``to_bytes``/``decode_message``.
    ``signature_memo``: Ed25519 verdicts all the clients share, as a simulation's sites do.
    """
    n = config.num_clients
    if set(inputs) != set(range(n)):
        raise ConfigError(f"inputs: need one vector for each client 0..{n - 1}")
    plan = _normalize_dropouts(dropouts, n)
    if plan.get("consistency") and not config.active:
        raise ConfigError("dropouts: the 'consistency' stage exists only in active mode")
    gone: set[int] = set()
    client_s = dict.fromkeys(range(n), 0.0)
    upload = dict.fromkeys(range(n), 0)
    download = dict.fromkeys(range(n), 0)
    errors: dict[int, str] = {}
    server_s = 0.0
    stage_s: dict[str, dict[int, float]] = {}

    def charge(cid: int, stage: str, seconds: float) -> None:
        client_s[cid] += seconds
        per_client = stage_s.setdefault(stage, {})
        per_client[cid] = per_client.get(cid, 0.0) + seconds

    def transfer(msg: Message, sizes: dict[int, int], who: int) -> Message:
        sizes[who] += msg.wire_size()
        return decode_message(msg.to_bytes()) if wire else msg

    clients: dict[int, SecAggClient] = {}
    for cid in range(n):
        start = clock()
        key = identity_keys[cid] if identity_keys is not None else None
        clients[cid] = SecAggClient(cid, config, identity_key=key, seed=None if seeds is None else seeds[cid],
                                    signature_memo=signature_memo)
        clients[cid].set_input(inputs[cid])
        charge(cid, "setup", clock() - start)
    start = clock()
    server = SecAggServer(config)
    server_s += clock() - start

    gone |= plan.get("keys", frozenset())
    advertisements: dict[int, AdvertiseKeys] = {}
    for cid in range(n):
        if cid in gone:
            continue
        start = clock()
        msg: Message | None = clients[cid].advertise_keys()
        charge(cid, "keys", clock() - start)
        assert isinstance(msg, AdvertiseKeys)
        received = transfer(msg, upload, cid)
        assert isinstance(received, AdvertiseKeys)
        advertisements[cid] = received
    # As a server verifies them across its request threads: one batch over the cores, then each received.
    start = clock()
    server.verify_advertisements(list(advertisements.values()))
    for cid, adv in advertisements.items():
        server.receive(cid, adv)
    server_s += clock() - start

    # Which dropout stage applies once the server waits for a given kind of message.
    stage_of_server_state = {"R1ShareKeys": "shares", "R2MaskedInputCollection": "masked",
                             "ConsistencyCheck": "consistency", "R3Unmasking": "unmask"}
    while True:
        start = clock()
        outgoing = server.close_stage()
        server_s += clock() - start
        if not outgoing:
            break
        if server.aborted:
            for cid, out in outgoing.items():
                if cid not in gone:
                    clients[cid].handle(transfer(out, download, cid))
            break
        stage = stage_of_server_state[server.stage]
        gone |= plan.get(stage, frozenset())
        replies: list[tuple[int, Message]] = []
        complaints: list[tuple[int, tuple[ShareComplaint, ...]]] = []
        for cid, out in outgoing.items():
            if cid in gone:
                continue
            out = transfer(out, download, cid)
            start = clock()
            try:
                reply = clients[cid].handle(out)
            except SecAggError as err:
                errors[cid] = f"{type(err).__name__}: {err}"
                gone.add(cid)
                if isinstance(err, ShareComplaintsError):  # the evidence goes to the server, as a site's would
                    complaints.append((cid, err.complaints))
                charge(cid, stage, clock() - start)
                continue
            charge(cid, stage, clock() - start)
            if reply is not None:
                replies.append((cid, transfer(reply, upload, cid)))
        # The server takes the stage's messages together, as its own machine would: interleaved with
        # the clients' work on one core, its timings would pay for their cache misses.
        start = clock()
        for cid, reply in replies:
            try:
                server.receive(cid, reply)
            except SecAggError as err:  # a refused answer (a deviating client): it is left out, as a site's would be
                errors[cid] = f"refused by the server: {type(err).__name__}: {err}"
                gone.add(cid)
        for cid, evidence in complaints:
            server.judge_complaints(cid, evidence)
        server_s += clock() - start
    result = server.result if server.completed else None
    return SimulationResult(config, result, server.abort_reason, server_s, client_s, upload, download, errors,
                            stage_s, server.verdicts, server.blamed, server.misconduct)
