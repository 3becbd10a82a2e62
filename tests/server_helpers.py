"""Scripted protocol clients for server tests.

Each sends a *known* update vector through the real secure-aggregation client (``fedveil.secagg``,
via the clients' protobuf driver), so the server's released aggregate can be checked against the
true mean of the survivors' updates, and each can be told to go silent at a given stage to create a
dropout exactly there.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedveil.clients.secagg_driver import SecAggClientDriver, secagg_config
from fedveil.clients.update import encoder_for
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import ProtocolError
from fedveil.protocol.transport import ClientSession, InProcessTransport
from fedveil.secagg import beacon
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.identity_helpers import TEST_AUTHORITY

TASK = "fedveil.tasks.synthetic:task"

DIM = 11  # the synthetic logistic regression: 10 weights + bias


@dataclass
class Scripted:
    """A protocol client sending ``vector`` (scaled by the round number) with weight ``weight``."""

    coordinator: Coordinator
    name: str
    vector: np.ndarray
    weight: float = 1.0
    silent_at: dict[tuple[int, int], str] = field(default_factory=dict)
    """(round, n-th RoundStart of that round) → stage at which to stay silent."""
    results: list[tuple[int, int]] = field(default_factory=list)
    sent: dict[int, np.ndarray] = field(default_factory=dict)
    privacy: pb.LocalPrivacySpend | None = None
    """A local DP-SGD spend to report (with a ``loss`` metric) in every round the client trains."""
    transport: Any = None
    """Talk through this transport (e.g. a ``GrpcTransport``) instead of calling the coordinator."""
    stall_upload_s: float = 0.0
    """With a ``GrpcTransport``: send the first chunk of the masked input, then stall this long."""
    upload_error: Any = None
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # surfaced by the test
            self.error = err

    def _run(self) -> None:
        t = self.transport or InProcessTransport(self.coordinator, self.name)
        joined = t.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg",
                                       evaluates=True))  # it fills evaluation sums (ring_input)
        s = ClientSession.from_join(joined)
        # per-site metrics only where the job evaluates in the clear (the secure default refuses them)
        metrics = [pb.Metric(name="loss", value=0.5)] if joined.job.evaluation == "clear" else []
        driver: SecAggClientDriver | None = None
        rnd, nonce, skip = 0, b"", ""
        starts: dict[int, int] = {}
        start = pb.RoundStart()
        mine, commitments = b"", {}
        while True:
            resp = t.poll(pb.PollRequest(header=s.header(), max_wait_ms=500))
            kind = resp.WhichOneof("instruction")
            try:
                if kind == "round_start":
                    start = resp.round_start
                    if (start.round, start.round_nonce) != (rnd, nonce):  # a new attempt (the server re-sends
                        rnd, nonce = start.round, start.round_nonce  # its RoundStart until it is answered)
                        starts[rnd] = starts.get(rnd, 0) + 1
                        skip = self.silent_at.get((rnd, starts[rnd]), "")
                    if skip == "training":
                        continue
                    mine = os.urandom(32)
                    t.respond_to_round(pb.RoundResponse(
                        header=s.header(rnd, nonce), accept=True,
                        commitment=beacon.commitment(start.secagg.round_id, start.client_id, mine),
                        weight=float(self.weight) if start.encoding.weighted else 0.0))
                elif kind == "commitments":
                    commitments = {c.client_id: c.commitment for c in resp.commitments.commitments}
                    t.reveal_contribution(pb.RevealRequest(header=s.header(rnd, nonce), contribution=mine))
                elif kind == "contributions":
                    reveals = {r.client_id: r.contribution for r in resp.contributions.reveals}
                    graph_seed = beacon.combine(start.secagg.round_id, commitments, reveals)
                    if self.privacy is not None:
                        t.report_metrics(pb.MetricsReport(
                            header=s.header(rnd, nonce), model_version=start.model.version, num_examples=100,
                            metrics=metrics, privacy=self.privacy))
                    driver = SecAggClientDriver(start, seed=os.urandom(32), graph_seed=graph_seed)
                    update = self.vector * rnd
                    driver.set_input(ring_input(start, update, self.weight))
                    self.sent[rnd] = update
                    t.advertise_keys(pb.AdvertiseKeysRequest(header=s.header(rnd, nonce), **driver.advertise()))
                elif kind == "peer_keys" and driver is not None and skip != "share-keys":
                    t.share_keys(pb.ShareKeysRequest(header=s.header(rnd, nonce),
                                                     shares=driver.share_keys(resp.peer_keys)))
                elif kind == "incoming_shares" and driver is not None and skip != "masked-input":
                    masked = driver.masked_input(resp.incoming_shares)
                    if self.stall_upload_s:
                        self._stalled_upload(t, s.header(rnd, nonce), masked)
                        driver, skip = None, "masked-input"  # this round is lost for this client
                    else:
                        t.submit_masked_input(pb.MaskedInputRequest(header=s.header(rnd, nonce),
                                                                    masked_vector=masked))
                elif kind == "unmasking" and driver is not None and skip != "unmasking":
                    t.unmask(pb.UnmaskRequest(header=s.header(rnd, nonce), shares=driver.unmask(resp.unmasking)))
                elif kind == "round_result":
                    self.results.append((resp.round_result.round, resp.round_result.outcome))
                    driver = None
                elif kind == "evaluate":
                    ev = resp.evaluate
                    t.report_metrics(pb.MetricsReport(header=s.header(ev.phase, ev.round_nonce),
                                                      model_version=ev.round, num_examples=10,
                                                      metrics=[pb.Metric(name="loss", value=float(self.weight))]))
                elif kind == "job_done":
                    self.done = True
                    return
            except ProtocolError:
                driver = None  # a closed stage: wait for the round result


    def _stalled_upload(self, t: Any, header: pb.RequestHeader, masked: bytes) -> None:
        import grpc

        def chunks() -> Any:
            yield pb.MaskedInputChunk(header=header, total_bytes=len(masked), data=masked[:8])
            time.sleep(self.stall_upload_s)
            yield pb.MaskedInputChunk(data=masked[8:])

        try:
            t._upload(chunks(), metadata=t._metadata, timeout=self.stall_upload_s + 30)
        except grpc.RpcError as err:
            self.upload_error = err.code()


def ring_input(start: pb.RoundStart, update: np.ndarray, weight: float) -> np.ndarray:
    """What a site masks: its encoded update and, when the round asks, evaluation sums (here the loss
    ``weight`` over 10 examples), or only those in an evaluation-only round."""
    from fedveil.clients.update import evaluation_layout

    layout = evaluation_layout(start.encoding)
    dtype = np.dtype(np.uint32 if start.encoding.ring_bits <= 32 else np.uint64)
    section = layout.encode({"loss": float(weight)}, 10, dtype) if layout is not None else np.zeros(0, dtype)
    if start.purpose == pb.ROUND_PURPOSE_EVALUATE:
        return section
    enc = encoder_for(start.encoding, start.secagg.cohort_size)
    ring = enc.encode(update, os.urandom(16), weight=weight) if enc.weighted else enc.encode(update, os.urandom(16))
    return np.concatenate([ring.astype(dtype), section])


@contextmanager
def coordinator_watchdog(seconds: float) -> Iterator[Callable[[Coordinator], None]]:
    """A callback that stops the coordinator it is given after ``seconds``; the timers it armed are
    cancelled on exit. For jobs that must not wait: one that hangs fails instead of the test run."""
    timers: list[threading.Timer] = []

    def arm(coordinator: Coordinator) -> None:
        timers.append(threading.Timer(seconds, coordinator.stop))
        timers[-1].start()

    try:
        yield arm
    finally:
        for timer in timers:
            timer.cancel()


def enroll_all(store: RunStore, names: Sequence[str]) -> None:
    """Enroll each of ``names`` not enrolled yet (a resumed run's store keeps its enrollments)."""
    for name in names:
        if not store.client_enrolled(name):
            store.enroll(name)


def make_job(tmp_path: Path, names: list[str], **overrides: object) -> tuple[Coordinator, RunStore]:
    torch.set_num_threads(1)
    store = RunStore(tmp_path / "run.db")
    enroll_all(store, names)
    settings: dict[str, object] = dict(task=TASK, rounds=1, clients_per_round=len(names), min_clients=len(names),
                                       round_timeout=30.0, stage_timeout=1.5, cohort_wait=0.0, linger=1.0, seed=3,
                                       poll_wait=0.5, evaluate=False, final_evaluation=False, active_adversary=False)
    settings.update(overrides)
    if settings.get("active_adversary"):
        settings.setdefault("consortium", TEST_AUTHORITY.consortium)
        settings.setdefault("authority_public_key", TEST_AUTHORITY.public_key.raw.hex())
    config = ServerConfig.from_flat(**settings)  # type: ignore[arg-type]
    return Coordinator(config, load_task(TASK), store), store


def run_job(coordinator: Coordinator, clients: list[Scripted]) -> JobSummary:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for th in threads:
        th.start()
    finished = threading.Event()

    def watchdog() -> None:  # a client that crashed would leave the server waiting: fail fast
        while not finished.wait(0.2):
            if any(c.error is not None for c in clients):
                coordinator.stop()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    summary = coordinator.run()
    finished.set()
    for th in threads:
        th.join(30)
    for c in clients:
        assert c.error is None, f"{c.name}: {c.error!r}"
    return summary


def vectors(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.5, 0.5, DIM) for _ in range(n)]


@dataclass
class ActiveScripted:
    """Active-adversary mode: drives :class:`fedveil.secagg.client.SecAggClient` directly with an
    Ed25519 identity key announced at Join (signed keys, consistency check, signed survivor sets)."""

    coordinator: Coordinator
    name: str
    vector: np.ndarray
    silent_at: str = ""
    results: list[tuple[int, int]] = field(default_factory=list)
    transport: Any = None
    """Talk through this transport instead of calling the coordinator; then a refused message ends the
    round for this client, as for :class:`Scripted` (without one it is raised)."""
    done: bool = False
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.identity, self.credential = TEST_AUTHORITY.identity(self.name, now=int(time.time()))

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:
            self.error = err

    def _run(self) -> None:
        from fedveil.secagg import messages as sa
        from fedveil.secagg.client import SecAggClient
        t = self.transport or InProcessTransport(self.coordinator, self.name)
        public = self.identity.public_key().public_bytes_raw()
        s = ClientSession.from_join(t.join(pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg", identity_public_key=public,
            identity_credential=self.credential.encode(), evaluates=True)))
        client: SecAggClient | None = None
        rnd, nonce, rid, me = 0, b"", 0, 0
        start = pb.RoundStart()
        mine, commitments = b"", {}
        while True:
            resp = t.poll(pb.PollRequest(header=s.header(), max_wait_ms=500))
            kind = resp.WhichOneof("instruction")
            try:
                if kind == "round_start":
                    start = resp.round_start
                    rnd, nonce, rid, me = start.round, start.round_nonce, start.secagg.round_id, start.client_id
                    mine = os.urandom(32)
                    t.respond_to_round(pb.RoundResponse(header=s.header(rnd, nonce), accept=True,
                                                        commitment=beacon.commitment(rid, me, mine)))
                elif kind == "commitments":
                    commitments = {c.client_id: c.commitment for c in resp.commitments.commitments}
                    t.reveal_contribution(pb.RevealRequest(header=s.header(rnd, nonce), contribution=mine))
                elif kind == "contributions":
                    reveals = {r.client_id: r.contribution for r in resp.contributions.reveals}
                    # as a real site builds it (active mode from the server), with the seed it derived itself
                    config = secagg_config(start, beacon.combine(rid, commitments, reveals))
                    assert config.active
                    client = SecAggClient(me, config, identity_key=self.identity)
                    client.set_input(ring_input(start, self.vector, 1.0))
                    adv = client.advertise_keys()
                    t.advertise_keys(pb.AdvertiseKeysRequest(
                        header=s.header(rnd, nonce), encryption_public_key=adv.share_public,
                        masking_public_key=adv.mask_public, signature=adv.signature))
                elif kind == "peer_keys" and client is not None:
                    advs = tuple(sa.AdvertiseKeys(rid, k.client_id, k.encryption_public_key, k.masking_public_key,
                                                  k.signature) for k in resp.peer_keys.keys)
                    reply = client.handle(sa.ShareKeysRequest(rid, me, advs))
                    assert isinstance(reply, sa.ShareKeysResponse)
                    t.share_keys(pb.ShareKeysRequest(header=s.header(rnd, nonce), shares=[
                        pb.EncryptedShare(peer_id=h, ciphertext=b) for h, b in sorted(reply.boxes.items())]))
                elif kind == "incoming_shares" and client is not None and self.silent_at != "masked-input":
                    boxes = {x.peer_id: x.ciphertext for x in resp.incoming_shares.shares}
                    reply = client.handle(sa.MaskedInputRequest(rid, me, boxes))
                    assert isinstance(reply, sa.MaskedInputResponse)
                    t.submit_masked_input(pb.MaskedInputRequest(header=s.header(rnd, nonce),
                                                                masked_vector=reply.vector.astype("<u4").tobytes()))
                elif kind == "survivor_check" and client is not None:
                    reply = client.handle(sa.ConsistencyCheckRequest(
                        rid, me, np.asarray(list(resp.survivor_check.survivors), dtype=np.uint32)))
                    assert isinstance(reply, sa.ConsistencyCheckResponse)
                    t.confirm_survivors(pb.ConfirmSurvivorsRequest(header=s.header(rnd, nonce),
                                                                   signature=reply.signature))
                elif kind == "unmasking" and client is not None:
                    u = resp.unmasking
                    reply = client.handle(sa.UnmaskingRequest(
                        rid, me, np.asarray(list(u.survivors), dtype=np.uint32),
                        np.asarray(list(u.dropped), dtype=np.uint32),
                        {x.client_id: x.signature for x in u.signatures}))
                    assert isinstance(reply, sa.UnmaskingResponse)
                    shares = [pb.RevealedShare(owner_id=int(o), kind=pb.SHARE_KIND_SELF_MASK_SEED,
                                               share=row.astype("<u4").tobytes(), salt=salt.tobytes())
                              for o, row, salt in zip(reply.self_mask_owners.tolist(), reply.self_mask_shares,
                                                      reply.self_mask_salts, strict=True)]
                    shares += [pb.RevealedShare(owner_id=int(o), kind=pb.SHARE_KIND_MASKING_KEY,
                                                share=row.astype("<u4").tobytes(), salt=salt.tobytes())
                               for o, row, salt in zip(reply.mask_key_owners.tolist(), reply.mask_key_shares,
                                                       reply.mask_key_salts, strict=True)]
                    t.unmask(pb.UnmaskRequest(header=s.header(rnd, nonce), shares=shares))
                elif kind == "round_result":
                    self.results.append((resp.round_result.round, resp.round_result.outcome))
                    client = None
                elif kind == "job_done":
                    self.done = True
                    return
            except ProtocolError:
                if self.transport is None:  # the honest default: surfaced by the test
                    raise
                client = None  # refused: wait for the round result


def read_store(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on a live server's store, read without writing to it ([] until it exists)."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return list(conn.execute(sql).fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return []
