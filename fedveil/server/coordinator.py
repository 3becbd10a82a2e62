"""The coordinator: the server's protocol logic, independent of any transport.

:class:`Coordinator` implements :class:`fedveil.protocol.transport.FederationService`: every
RPC is a method taking the authenticated caller's name and the decoded request (a protobuf
message object). The gRPC servicer (``fedveil.protocol.service``) and the in-process
simulation (``fedveil.protocol.transport.InProcessTransport``) call the same methods, so the
network adds transport and nothing else.

Two kinds of threads meet here, synchronised by one condition variable:

- **RPC handlers** validate a request (session, sequence number, run, round, nonce, stage,
  field sizes), hand secure-aggregation messages to the round's
  :class:`fedveil.secagg.server.SecAggServer` (which adds masked inputs into its running sum
  at once: the server holds O(m), never n vectors), and return. A poll waits on the condition
  until the caller has something to do (bounded by ``poll_wait``).
- **The driver** (:meth:`Coordinator.run`) runs the job: waits for a cohort, starts a round,
  closes each stage when every live participant has answered or its deadline passes (the rest
  are dropouts), applies the unmasked sum to the global model, and commits the round, its
  checkpoint and the privacy ledger to the store in one transaction. Stage closing runs outside
  the lock (unmasking is the heavy part) while late messages for that stage get ABORTED.

Restart: a coordinator opened on a store whose latest run has the same job settings resumes it
from the last completed round; rounds left running by a killed server are marked interrupted
and redone with a new cohort and nonce.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedveil.dp.ledger import BudgetExceededError, PrivacyLedger
from fedveil.errors import FedveilError
from fedveil.metrics import DEFAULT_METRICS, weighted_metrics
from fedveil.model_spec import ModelSpec
from fedveil.protocol import PROTOCOL_VERSION, ROUND_NONCE_BYTES, SESSION_ID_BYTES
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.binding import bound_context
from fedveil.protocol.codec import decode_ring_vector, model_message
from fedveil.protocol.errors import (
    Incompatible,
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    Replayed,
    StageClosed,
    Unavailable,
)
from fedveil.protocol.uploads import UploadReservation
from fedveil.secagg import errors as sa_errors
from fedveil.secagg import messages as sa
from fedveil.secagg.beacon import BeaconCollector, BeaconError
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import ConfigError
from fedveil.secagg.identity import RevocationList, SiteCredential, verify_credential
from fedveil.secagg.server import SecAggServer
from fedveil.secagg.threshold import ThresholdPlan
from fedveil.server.config import ServerConfig
from fedveil.server.events import (
    EvaluationRecorded,
    JobFinished,
    JobListener,
    Listeners,
    RoundAborted,
    RoundCompleted,
    RoundRejected,
    RoundStarted,
)
from fedveil.server.reports import (
    CheckedReport,
    SpendContext,
    check_report,
    ledger_details,
    spend_record,
    verify_spend,
)
from fedveil.server.sanity import AggregateRejected
from fedveil.server.store import RunStore
from fedveil.server.training import GlobalModel, RoundPlan, round_seed
from fedveil.server.uploads import UploadBook
from fedveil.task import Task

log = logging.getLogger("fedveil.server")

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_SHARE_BOX_BYTES = 4096
MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_CREDENTIAL_BYTES = 1024
WAIT_RETRY_MS = 200
SECURE_SUM_ROW = "(secure sum)"
"""The evaluations row of a cohort's securely summed metrics (no site's own figures are ever stored)."""


class Stage(enum.IntEnum):
    """A round's stages in the order they run (values order them; :attr:`wire` is the protobuf enum)."""

    COMMIT = 1
    REVEAL = 2
    TRAINING = 3
    SHARE_KEYS = 4
    MASKED_INPUT = 5
    CONSISTENCY = 6
    UNMASKING = 7
    EVALUATION = 8

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @property
    def wire(self) -> str:
        return f"STAGE_{self.name}"


class JobError(FedveilError, RuntimeError):
    """The job cannot go on (e.g. every attempt at a round aborted); the message says why."""


@dataclass
class _Client:
    name: str
    session_id: bytes
    last_sequence: int = 0
    last_seen: float = 0.0
    num_examples: int = 0
    identity_key: bytes = b""
    polling: int = 0
    poll_token: object | None = None
    pending_result: pb.RoundResult | None = None
    job_done_sent: bool = False
    disconnected: bool = False
    credential: bytes = b""
    trust_server: bool = False


@dataclass
class _Round:
    number: int
    attempt: int
    nonce: bytes
    plan: RoundPlan
    config: SecAggConfig
    """The round's secagg parameters before the graph seed is known (fixed once REVEAL closes)."""
    beacon: BeaconCollector
    cohort: dict[str, int]
    names: dict[int, str]
    started_wall: float
    purpose: int = pb.ROUND_PURPOSE_TRAIN
    secagg: SecAggServer | None = None
    stage: Stage = Stage.COMMIT
    deadline: float = 0.0
    deadline_wall: float = 0.0
    closing: bool = False
    outgoing: dict[int, sa.Message] = field(default_factory=dict)
    submitted: dict[str, set[Stage]] = field(default_factory=dict)
    dropped: dict[str, tuple[str, str]] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)
    """Dropouts already recorded: one left at commit is still pending in the secagg stages after it."""
    evaluated: set[str] = field(default_factory=set)
    commitments: dict[int, bytes] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    """Weighted rounds: each member's weight as declared in the clear when it accepted."""

    @property
    def expected(self) -> tuple[int, ...]:
        return self.beacon.expected if self.secagg is None else self.secagg.expected

    @property
    def pending(self) -> tuple[int, ...]:
        return self.beacon.pending if self.secagg is None else self.secagg.pending

    def live_pending(self) -> list[int]:
        return [sid for sid in self.pending if self.names[sid] not in self.dropped]


@dataclass
class _Evaluation:
    version: int
    nonce: bytes
    phase: int
    deadline: float
    deadline_wall: float
    participants: set[str]
    reported: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class JobSummary:
    run_id: str
    status: str
    completed_rounds: int
    total_rounds: int
    resumed_from: int
    aborted_attempts: int
    dropouts: int
    final_metrics: dict[str, float]
    epsilon: float | None
    delta: float | None
    message: str
    rejected_rounds: int = 0
    """Rounds whose unmasked sum no honest cohort could produce (skipped, model unchanged)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "completed_rounds": self.completed_rounds,
            "total_rounds": self.total_rounds,
            "resumed_from": self.resumed_from,
            "aborted_attempts": self.aborted_attempts,
            "dropouts": self.dropouts,
            "final_metrics": self.final_metrics,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "message": self.message,
            "rejected_rounds": self.rejected_rounds,
        }


def _credential_serial(raw: bytes) -> str:
    try:
        return SiteCredential.decode(raw).serial.hex()[:16]
    except sa_errors.SecAggError:
        return "?"


def _metrics_dict(items: Any) -> dict[str, float]:
    return {m.name: float(m.value) for m in items}


class Coordinator:
    """Runs one federated job against a :class:`RunStore`; see the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        task: Task,
        store: RunStore,
        *,
        new_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[JobListener] = (),
    ) -> None:
        self.config = config
        self.listeners = Listeners(listeners)
        """Told of every round and of the job's end (:mod:`fedveil.server.events`); add with ``.add``."""
        self.task = task
        self.store = store
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._clients: dict[str, _Client] = {}
        self._round: _Round | None = None
        self._evaluation: _Evaluation | None = None
        self._past_nonces: set[bytes] = set()
        self._done: pb.JobDone | None = None
        self._stopping = False
        self._stop_event = threading.Event()
        self._aborted_attempts = 0
        self._dropouts = 0
        self._final_metrics: dict[str, float] = {}
        self._waiting_polls = 0
        self.max_waiting_polls: int | None = None
        """Cap on polls held at once (the gRPC runner sets it below its worker count, so long polls
        can never occupy every worker and stall the submissions of a round)."""
        self.resumed_from = 0
        self.inline_model = True
        """Send the model inside RoundStart/Evaluate (in-process). The gRPC runner turns it off:
        over the network clients fetch it in chunks (``FetchModel``), so concurrent downloads
        share one buffer instead of one serialized copy per client."""
        self._open_run(new_run)
        self._model_cache: tuple[int, pb.Model, pb.Model, bytes] | None = None
        self._barred: dict[int, set[str]] = {}
        """round → sites that withheld a graph-seed reveal in it (left out of its later attempts)."""
        self._last_secure_metrics: dict[str, float] = {}
        self._rejected_rounds = 0
        self.revocations: RevocationList | None = None
        """The authority's revocation list the operator gave (``--revocations``), for Join checks."""

    # ------------------------------------------------------------------------------------------
    # Run creation and resume
    # ------------------------------------------------------------------------------------------
    def _open_run(self, new_run: bool) -> None:
        import torch

        latest = self.store.latest_run()
        mode = "new"
        if latest is not None and not new_run:
            wanted = self.config
            if wanted.seed is None and latest.config.get("seed") is not None:
                wanted = ServerConfig.from_dict({**wanted.to_dict(), "seed": latest.config["seed"]})
            diffs = wanted.differences(latest.config)
            if latest.status in ("running", "failed", "stopped"):
                if diffs:
                    raise JobError(
                        f"store {str(self.store.path)!r} holds unfinished run {latest.run_id} with other settings; "
                        "repeat the original command to resume it, or pass --new-run:\n  " + "\n  ".join(diffs)
                    )
                mode, self.config = "resume", wanted
            elif not diffs:
                mode, self.config = "finished", wanted
        if self.config.seed is None:
            self.config = ServerConfig.from_dict({**self.config.to_dict(), "seed": secrets.randbits(62)})
        assert self.config.seed is not None
        self.seed = int(self.config.seed)
        torch.manual_seed(self.seed)
        built = self.task.build_model()
        self.model_spec = ModelSpec.of(built)
        """The job's model by name: sent at Join, the layout of every model and update vector."""
        initial = self.model_spec.vector(built)
        self.model = GlobalModel(self.config, initial, self.seed)
        self.finished: dict[str, Any] | None = None
        if mode in ("resume", "finished") and latest is not None:
            self.run_id = latest.run_id
            interrupted = self.store.interrupt_unfinished_rounds(self.run_id)
            ckpt = self.store.latest_checkpoint(self.run_id)
            if ckpt is not None:
                self.model.load(ckpt.model, ckpt.state, self.store.ledger_json(self.run_id))
            self.resumed_from = self.model.version
            if mode == "finished":
                self.finished = dict(latest.summary or {})
                log.info("run %s already finished (%s)", self.run_id, latest.status)
            else:
                log.info("resuming run %s after round %d (%d interrupted round(s) will be redone)",
                         self.run_id, self.model.version, interrupted)
        else:
            self.run_id = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
            self.store.create_run(self.run_id, self.config.resume_key())
            self.store.save_initial_checkpoint(self.run_id, self.model.params, self.model.state_dict())
            log.info("started run %s: %d rounds of %d clients", self.run_id, self.config.rounds,
                     self.config.clients_per_round)
        self._attempts: dict[int, int] = {}  # round → last attempt number in the store (unique ids)
        self._tries: dict[int, int] = {}  # round → attempts since this start (--max-round-attempts)
        for rec in self.store.rounds(self.run_id):
            self._attempts[rec.round] = max(self._attempts.get(rec.round, 0), rec.attempt)
            if rec.status == "aborted":
                self._aborted_attempts += 1
        self._dropouts = len(self.store.dropouts(self.run_id))
        self._max_message_bytes = self._compute_max_message_bytes()

    @property
    def _evaluation_mode(self) -> str:
        """Federated evaluation as the job runs it: off under user-level DP (its sums would be released
        without the round's noise), else the configured mode."""
        if not self.config.evaluate and not self.config.final_evaluation:
            return "off"
        return "off" if self.config.user_level_dp else self.config.evaluation

    def _secure_metrics(self) -> tuple[str, ...]:
        if self._evaluation_mode != "secure":
            return ()
        return tuple(self.task.metrics or DEFAULT_METRICS)

    @property
    def completed_rounds(self) -> int:
        return self.model.version

    @property
    def job_info(self) -> pb.JobInfo:
        cfg = self.config
        return pb.JobInfo(
            task_name=self.task.name, total_rounds=cfg.rounds, completed_rounds=self.model.version,
            clients_per_round=cfg.clients_per_round, min_clients=cfg.min_clients, secagg_graph=cfg.secagg,
            dp_mode=cfg.dp, active_adversary=cfg.active_adversary, consortium=cfg.consortium,
            evaluation=self._evaluation_mode, max_corrupt_fraction=cfg.max_corrupt_fraction,
            model=self.model_spec.to_proto(),  # type: ignore[arg-type]
        )

    def max_message_bytes(self) -> int:
        """The inbound size limit: the largest legitimate message (a masked input) plus headroom."""
        return self._max_message_bytes

    def _compute_max_message_bytes(self) -> int:
        plan = self.model.plan(1, self.config.clients_per_round, 2, b"size")
        itemsize = 4 if plan.ring_bits <= 32 else 8
        model_bytes = 4 * self.model.dim
        return max(4 << 20, plan.dimension * itemsize + (1 << 20), model_bytes + (1 << 20))

    # ------------------------------------------------------------------------------------------
    # Validation helpers (called with the lock held)
    # ------------------------------------------------------------------------------------------
    def _session(self, caller: str, header: pb.RequestHeader, rpc: str, *, consume: bool = True) -> _Client:
        if header.protocol_version != PROTOCOL_VERSION:
            raise OutOfOrder(f"header.protocol_version: expected {PROTOCOL_VERSION}, got {header.protocol_version}")
        if len(header.session_id) != SESSION_ID_BYTES:
            raise MalformedMessage(
                f"header.session_id: expected {SESSION_ID_BYTES} bytes, got {len(header.session_id)}"
            )
        client = self._clients.get(caller)
        if client is None or not hmac.compare_digest(client.session_id, header.session_id):
            raise OutOfOrder(f"{rpc}: unknown or replaced session (the server restarted or you joined again); Join")
        if header.run_id != self.run_id:
            raise OutOfOrder(f"header.run_id: {header.run_id!r} is not the current run {self.run_id!r}; Join again")
        client.disconnected = False
        if not consume:
            return client
        if header.sequence <= client.last_sequence:
            raise Replayed(
                f"{rpc}: replayed message (sequence {header.sequence}, last seen {client.last_sequence})"
            )
        client.last_sequence = header.sequence
        client.last_seen = self._clock()
        return client

    def _round_for(self, client: _Client, header: pb.RequestHeader, stage: Stage, rpc: str) -> tuple[_Round, int]:
        rnd = self._round
        if len(header.round_nonce) != ROUND_NONCE_BYTES:
            raise MalformedMessage(
                f"header.round_nonce: expected {ROUND_NONCE_BYTES} bytes, got {len(header.round_nonce)}"
            )
        if rnd is None or header.round != rnd.number or not hmac.compare_digest(header.round_nonce, rnd.nonce):
            if header.round_nonce in self._past_nonces or (rnd is not None and header.round < rnd.number):
                raise StageClosed(f"{rpc}: round {header.round} is over")
            raise OutOfOrder(f"{rpc}: round {header.round} with this nonce is not running; Join again")
        sid = rnd.cohort.get(client.name)
        if sid is None:
            raise PermissionDenied(f"{rpc}: {client.name!r} is not in the cohort of round {rnd.number}")
        if client.name in rnd.dropped:
            where, _why = rnd.dropped[client.name]
            raise StageClosed(f"{rpc}: you are a dropout of round {rnd.number} (at stage {where})")
        done = rnd.submitted.setdefault(client.name, set())
        if stage in done:
            raise Replayed(f"{rpc}: already received for round {rnd.number}")
        if stage != rnd.stage:
            if stage < rnd.stage:
                raise StageClosed(f"{rpc}: stage {stage.label} of round {rnd.number} is closed")
            raise OutOfOrder(f"{rpc}: stage {stage.label} is not open; round {rnd.number} is at {rnd.stage.label}")
        if rnd.closing:
            raise StageClosed(f"{rpc}: stage {stage.label} of round {rnd.number} closed at its deadline")
        if sid not in rnd.expected:
            raise StageClosed(f"{rpc}: you are not part of stage {stage.label} of round {rnd.number}")
        return rnd, sid

    def _feed(self, rnd: _Round, sid: int, message: sa.Message, stage: Stage, name: str) -> pb.Ack:
        assert rnd.secagg is not None
        try:
            rnd.secagg.receive(sid, message)
        except (sa_errors.MalformedMessageError, sa_errors.InvalidSignatureError) as err:
            raise MalformedMessage(f"{stage.label}: {err}") from None
        except sa_errors.WrongRoundError as err:
            raise OutOfOrder(f"{stage.label}: {err}") from None
        except sa_errors.UnexpectedMessageError as err:
            raise OutOfOrder(f"{stage.label}: {err}") from None
        except (sa_errors.SecAggError, ValueError) as err:
            raise MalformedMessage(f"{stage.label}: {err}") from None
        rnd.submitted.setdefault(name, set()).add(stage)
        if not rnd.live_pending():
            self._cond.notify_all()
        return pb.Ack(round=rnd.number, stage=stage.wire, detail="accepted")  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------
    # RPCs (FederationService)
    # ------------------------------------------------------------------------------------------
    def join(self, caller: str, request: pb.JoinRequest) -> pb.JoinResponse:
        if request.protocol_version != PROTOCOL_VERSION:
            raise Incompatible(
                f"protocol_version: the server speaks version {PROTOCOL_VERSION}, the client {request.protocol_version}"
            )
        if request.task_name and request.task_name != self.task.name:
            raise Incompatible(
                f"task_name: the server runs task {self.task.name!r}, the client has {request.task_name!r}"
            )
        if request.identity_public_key and len(request.identity_public_key) != PUBLIC_KEY_BYTES:
            raise MalformedMessage(f"identity_public_key: expected {PUBLIC_KEY_BYTES} bytes")
        enrolled_key = self.store.identity_key(caller)
        if enrolled_key and request.identity_public_key and request.identity_public_key != enrolled_key:
            raise PermissionDenied("identity_public_key: differs from the key enrolled for this client")
        if self.config.active_adversary and not (request.identity_public_key or enrolled_key):
            raise Incompatible(
                "identity_public_key: this job runs in active-adversary mode; the client needs an Ed25519 "
                "identity key (enrolled with fedveil enroll --identity-public-key, or sent at Join)"
            )
        credential = self._check_credential(caller, request, enrolled_key)
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            old = self._clients.get(caller)
            client = _Client(name=caller, session_id=os.urandom(SESSION_ID_BYTES), last_seen=self._clock(),
                             num_examples=int(request.num_examples),
                             identity_key=bytes(request.identity_public_key) or (enrolled_key or b""),
                             credential=credential, trust_server=bool(request.trust_server))
            if old is not None:
                client.pending_result = old.pending_result
                old.poll_token = None
            rnd = self._round
            if rnd is not None and caller in rnd.cohort and caller not in rnd.dropped:
                if rnd.submitted.get(caller) or rnd.stage > Stage.COMMIT:
                    rnd.dropped[caller] = (rnd.stage.label, "rejoined mid-round (its round state is lost)")
                    client.pending_result = pb.RoundResult(
                        round=rnd.number, outcome=pb.ROUND_OUTCOME_DROPPED, reason="rejoined mid-round"
                    )
                    self._cond.notify_all()
            self._clients[caller] = client
            self._cond.notify_all()
            log.info("client %s joined (session %s…; %s)", caller, client.session_id.hex()[:8],
                     "trusting the server (passive)" if request.trust_server else
                     ("malicious-server checks, credential " + _credential_serial(credential)
                      if credential else "malicious-server checks"))
            return pb.JoinResponse(
                session_id=client.session_id, run_id=self.run_id, client_name=caller, job=self.job_info,
                poll_interval_ms=WAIT_RETRY_MS, max_message_bytes=self.max_message_bytes(),
            )

    def _check_credential(self, caller: str, request: pb.JoinRequest, enrolled_key: bytes | None) -> bytes:
        """The site's authority credential: it must name the caller and its identity key. The sites check
        it against the authority they pinned; the server checks it too when it was given the authority
        (``--authority``), so a bad credential is refused at Join rather than in every round."""
        raw = bytes(request.identity_credential)
        if not raw:
            if self.config.active_adversary:
                raise Incompatible("identity_credential: this job runs with malicious-server protections; the site "
                                   "needs its credential from the consortium authority (fedveil authority issue)")
            return b""
        if len(raw) > MAX_CREDENTIAL_BYTES:
            raise MalformedMessage(f"identity_credential: at most {MAX_CREDENTIAL_BYTES} bytes")
        try:
            credential = SiteCredential.decode(raw)
        except sa_errors.SecAggError as err:
            raise MalformedMessage(f"identity_credential: {err}") from None
        key = bytes(request.identity_public_key) or (enrolled_key or b"")
        if credential.site_name != caller or credential.identity_public_key != key:
            raise PermissionDenied("identity_credential: it vouches for another site name or identity key "
                                   f"(it names {credential.site_name!r})")
        authority = self.config.authority_key_bytes
        if authority is not None:
            try:
                verify_credential(authority, credential, consortium=self.config.consortium, now=int(time.time()),
                                  revocations=self.revocations)
            except sa_errors.SecAggError as err:
                raise PermissionDenied(f"identity_credential: {err}") from None
        return raw

    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse:
        wait_s = min(request.max_wait_ms / 1000.0, self.config.poll_wait)
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down; retry later")
            client = self._session(caller, request.header, "Poll")
            token = object()
            client.poll_token = token
            client.polling += 1
            try:
                deadline = self._clock() + wait_s
                while True:
                    client.last_seen = self._clock()
                    instruction = self._instruction_for(client)
                    if instruction is not None:
                        return instruction
                    if client.poll_token is not token or self._clients.get(caller) is not client:
                        return pb.PollResponse(wait=pb.Wait(retry_after_ms=0, reason="superseded by a newer poll"))
                    remaining = deadline - self._clock()
                    if remaining <= 0 or self._stopping:
                        reason = self._wait_reason(client)
                        return pb.PollResponse(wait=pb.Wait(retry_after_ms=WAIT_RETRY_MS, reason=reason))
                    if self.max_waiting_polls is not None and self._waiting_polls >= self.max_waiting_polls:
                        return pb.PollResponse(wait=pb.Wait(retry_after_ms=2 * WAIT_RETRY_MS,
                                                            reason="server busy: poll again shortly"))
                    self._waiting_polls += 1
                    try:
                        self._cond.wait(min(remaining, 1.0))
                    finally:
                        self._waiting_polls -= 1
            finally:
                client.polling -= 1
                if not client.disconnected:
                    client.last_seen = self._clock()

    def client_disconnected(self, caller: str, session_id: bytes) -> None:
        """The transport saw ``caller``'s held poll cancelled (its process or connection is gone):
        it no longer counts as connected for cohorts, and its held poll is released at once.
        A round it is in still waits for its deadline (it may reconnect in time)."""
        with self._cond:
            client = self._clients.get(caller)
            if client is None or not hmac.compare_digest(client.session_id, session_id):
                return
            client.disconnected = True
            client.last_seen = float("-inf")
            client.poll_token = None
            self._cond.notify_all()
        log.info("client %s disconnected", caller)

    def respond_to_round(self, caller: str, request: pb.RoundResponse) -> pb.Ack:
        """A cohort member accepts the round with its graph-seed commitment, or declines it.

        A decline is honoured until the member's keys are in (COMMIT, REVEAL or TRAINING stage): it
        becomes a dropout at once, so nobody waits for its deadline. Its reason is logged, cut to one
        printable line.
        """
        if request.accept and len(request.commitment) != 32:
            raise MalformedMessage(f"commitment: expected 32 bytes, got {len(request.commitment)}")
        if request.accept and not math.isfinite(request.weight):
            raise MalformedMessage(f"weight: {request.weight!r} is not a finite number")
        with self._cond:
            client = self._session(caller, request.header, "RespondToRound")
            if request.accept:
                rnd, sid = self._round_for(client, request.header, Stage.COMMIT, "RespondToRound")
                if rnd.plan.encoding.weighted:
                    top = float(rnd.plan.encoding.max_weight)
                    if not 1.0 <= request.weight <= top:
                        raise MalformedMessage(f"weight: must be in [1, {top:g}] (got {request.weight:g})")
                    rnd.weights[sid] = float(request.weight)
                try:
                    rnd.beacon.receive_commitment(sid, bytes(request.commitment))
                except BeaconError as err:
                    raise MalformedMessage(f"commitment: {err}") from None
                rnd.submitted.setdefault(caller, set()).add(Stage.COMMIT)
                self._cond.notify_all()
                return pb.Ack(round=rnd.number, stage="STAGE_COMMIT", detail="accepted")
            current = self._round
            if current is None or request.header.round != current.number or not hmac.compare_digest(
                    request.header.round_nonce, current.nonce) or caller not in current.cohort:
                raise StageClosed("RespondToRound: no running round of yours to decline")
            rnd = current
            if caller in rnd.dropped:
                raise Replayed(f"RespondToRound: already out of round {rnd.number}")
            if rnd.stage > Stage.TRAINING or Stage.TRAINING in rnd.submitted.get(caller, set()):
                raise StageClosed(f"RespondToRound: too late to decline round {rnd.number} (its keys are in)")
            why = "".join(ch if ch.isprintable() else " " for ch in request.decline_reason[:256]).strip() or "-"
            sid = rnd.cohort[caller]
            if rnd.stage == Stage.COMMIT and Stage.COMMIT not in rnd.submitted.get(caller, set()):
                rnd.beacon.decline(sid)
            rnd.dropped[caller] = (rnd.stage.label, f"declined: {why}")
            log.info("round %d (attempt %d): %s declined at %s: %s", rnd.number, rnd.attempt, caller,
                     rnd.stage.label, why)
            self._cond.notify_all()
            return pb.Ack(round=rnd.number, stage=rnd.stage.wire, detail="declined")  # type: ignore[arg-type]

    def reveal_contribution(self, caller: str, request: pb.RevealRequest) -> pb.Ack:
        if len(request.contribution) != 32:
            raise MalformedMessage(f"contribution: expected 32 bytes, got {len(request.contribution)}")
        with self._cond:
            client = self._session(caller, request.header, "RevealContribution")
            rnd, sid = self._round_for(client, request.header, Stage.REVEAL, "RevealContribution")
            try:
                rnd.beacon.receive_reveal(sid, bytes(request.contribution))
            except BeaconError as err:
                raise MalformedMessage(f"contribution: {err}") from None
            rnd.submitted.setdefault(caller, set()).add(Stage.REVEAL)
            self._cond.notify_all()
            return pb.Ack(round=rnd.number, stage="STAGE_REVEAL", detail="accepted")

    def advertise_keys(self, caller: str, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        for name in ("encryption_public_key", "masking_public_key"):
            if len(getattr(request, name)) != PUBLIC_KEY_BYTES:
                raise MalformedMessage(f"{name}: expected {PUBLIC_KEY_BYTES} bytes, got {len(getattr(request, name))}")
        if len(request.signature) not in (0, SIGNATURE_BYTES):
            raise MalformedMessage(f"signature: expected 0 or {SIGNATURE_BYTES} bytes, got {len(request.signature)}")
        with self._cond:
            client = self._session(caller, request.header, "AdvertiseKeys")
            rnd, sid = self._round_for(client, request.header, Stage.TRAINING, "AdvertiseKeys")
            msg = sa.AdvertiseKeys(rnd.config.round_id, sid, bytes(request.encryption_public_key),
                                   bytes(request.masking_public_key), bytes(request.signature))
            return self._feed(rnd, sid, msg, Stage.TRAINING, caller)

    def share_keys(self, caller: str, request: pb.ShareKeysRequest) -> pb.Ack:
        boxes: dict[int, bytes] = {}
        for i, share in enumerate(request.shares):
            if share.peer_id in boxes:
                raise MalformedMessage(f"shares[{i}].peer_id: {share.peer_id} appears twice")
            if not 0 < len(share.ciphertext) <= MAX_SHARE_BOX_BYTES:
                raise MalformedMessage(f"shares[{i}].ciphertext: {len(share.ciphertext)} bytes is not a share box")
            boxes[int(share.peer_id)] = bytes(share.ciphertext)
        with self._cond:
            client = self._session(caller, request.header, "ShareKeys")
            rnd, sid = self._round_for(client, request.header, Stage.SHARE_KEYS, "ShareKeys")
            if len(boxes) > rnd.plan.cohort_size:
                raise MalformedMessage(f"shares: {len(boxes)} boxes for a cohort of {rnd.plan.cohort_size}")
            msg = sa.ShareKeysResponse(rnd.config.round_id, sid, boxes)
            return self._feed(rnd, sid, msg, Stage.SHARE_KEYS, caller)

    def submit_masked_input(self, caller: str, request: pb.MaskedInputRequest) -> pb.Ack:
        return self.submit_masked_vector(caller, request.header, request.masked_vector)

    def submit_masked_vector(
        self, caller: str, header: pb.RequestHeader, data: bytes | bytearray | memoryview,
        reservation: UploadReservation | None = None,
    ) -> pb.Ack:
        """The masked input (``SubmitMaskedInput``, or reassembled from ``UploadMaskedInput`` under the
        ``reservation`` that :meth:`masked_input_size` made, whose header's sequence number is spent)."""
        with self._cond:
            if reservation is None:
                client = self._session(caller, header, "SubmitMaskedInput")
            else:
                client = self._session(caller, header, "UploadMaskedInput", consume=False)
                if not self._upload_book().holds(reservation) or reservation.site != caller:
                    raise StageClosed("UploadMaskedInput: this upload no longer holds its reservation")
            rnd, sid = self._round_for(client, header, Stage.MASKED_INPUT, "SubmitMaskedInput")
            if reservation is None and self._upload_book().active(caller, rnd.nonce, Stage.MASKED_INPUT):
                raise Replayed("SubmitMaskedInput: an upload from this site for this stage is in progress")
            vector = decode_ring_vector(data, rnd.plan.dimension, rnd.plan.ring_bits)
            msg = sa.MaskedInputResponse(rnd.config.round_id, sid, vector)
            ack = self._feed(rnd, sid, msg, Stage.MASKED_INPUT, caller)
            if reservation is not None:
                self._upload_book().complete(reservation)
            return ack

    def masked_input_size(
        self, caller: str, header: pb.RequestHeader, alive: Callable[[], bool] = lambda: True
    ) -> UploadReservation:
        """Reserve, before an upload's data is received, this site's one upload for the stage.

        Checks that the upload is wanted and spends the header's sequence number, so the same header
        cannot open a second stream; a second stream for the same site and stage is refused while this
        one is open (``Replayed``: ALREADY_EXISTS). Returns the reservation (``size``: the exact byte
        size of the masked input); the transport releases it if the upload fails
        (:mod:`fedveil.protocol.uploads`)."""
        with self._cond:
            client = self._session(caller, header, "UploadMaskedInput")
            rnd, _sid = self._round_for(client, header, Stage.MASKED_INPUT, "UploadMaskedInput")
            size = rnd.plan.dimension * (4 if rnd.plan.ring_bits <= 32 else 8)
            res = self._upload_book().reserve(caller, rnd.number, rnd.nonce, Stage.MASKED_INPUT,
                                              int(header.sequence), size, alive)
            res.on_release = self._release_upload
            res.still_wanted = self._upload_wanted
            return res

    # -- upload reservations (fedveil.protocol.uploads) -------------------------------------------
    _uploads: UploadBook | None = None

    def _upload_book(self) -> UploadBook:
        if self._uploads is None:
            self._uploads = UploadBook()
        return self._uploads

    def _release_upload(self, res: UploadReservation, counted: bool) -> None:
        with self._cond:
            self._upload_book().release(res, counted)

    def _upload_wanted(self, res: UploadReservation) -> bool:
        """Whether the stage ``res`` was reserved for still takes it (its waiting is over if not)."""
        with self._cond:
            rnd = self._round
            client = self._clients.get(res.site)
            return (self._upload_book().holds(res) and rnd is not None and rnd.nonce == res.nonce
                    and rnd.stage == res.stage and not rnd.closing and res.site not in rnd.dropped
                    and client is not None and not self._stopping)

    def fetch_model(self, caller: str, request: pb.FetchModelRequest) -> bytes:
        """The current model's bytes (``Model.data``) for a client holding a valid session."""
        with self._cond:
            self._session(caller, request.header, "FetchModel", consume=False)
            if request.version != self.model.version:
                raise StageClosed(f"FetchModel: version {request.version} is not the current model "
                                  f"(version {self.model.version}); poll again")
            return self._model_entry()[3]

    def confirm_survivors(self, caller: str, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        if len(request.signature) != SIGNATURE_BYTES:
            raise MalformedMessage(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(request.signature)}")
        with self._cond:
            client = self._session(caller, request.header, "ConfirmSurvivors")
            rnd, sid = self._round_for(client, request.header, Stage.CONSISTENCY, "ConfirmSurvivors")
            msg = sa.ConsistencyCheckResponse(rnd.config.round_id, sid, bytes(request.signature))
            return self._feed(rnd, sid, msg, Stage.CONSISTENCY, caller)

    def unmask(self, caller: str, request: pb.UnmaskRequest) -> pb.Ack:
        groups: dict[int, tuple[list[int], list[np.ndarray]]] = {
            pb.SHARE_KIND_SELF_MASK_SEED: ([], []),
            pb.SHARE_KIND_MASKING_KEY: ([], []),
        }
        limbs = {pb.SHARE_KIND_SELF_MASK_SEED: sa.SELF_MASK_LIMBS, pb.SHARE_KIND_MASKING_KEY: sa.MASK_KEY_LIMBS}
        for i, share in enumerate(request.shares):
            if share.kind not in groups:
                raise MalformedMessage(f"shares[{i}].kind: {share.kind} is not a share kind")
            want = 4 * limbs[share.kind]
            if len(share.share) != want:
                raise MalformedMessage(f"shares[{i}].share: expected {want} bytes, got {len(share.share)}")
            owners, rows = groups[share.kind]
            owners.append(int(share.owner_id))
            rows.append(np.frombuffer(share.share, dtype="<u4").astype(np.uint32))
        with self._cond:
            client = self._session(caller, request.header, "Unmask")
            rnd, sid = self._round_for(client, request.header, Stage.UNMASKING, "Unmask")
            sm_owners, sm_rows = groups[pb.SHARE_KIND_SELF_MASK_SEED]
            mk_owners, mk_rows = groups[pb.SHARE_KIND_MASKING_KEY]
            msg = sa.UnmaskingResponse(
                rnd.config.round_id, sid,
                np.asarray(sm_owners, dtype=np.uint32),
                np.stack(sm_rows) if sm_rows else np.zeros((0, sa.SELF_MASK_LIMBS), np.uint32),
                np.asarray(mk_owners, dtype=np.uint32),
                np.stack(mk_rows) if mk_rows else np.zeros((0, sa.MASK_KEY_LIMBS), np.uint32),
            )
            return self._feed(rnd, sid, msg, Stage.UNMASKING, caller)

    def report_metrics(self, caller: str, request: pb.MetricsReport) -> pb.Ack:
        report = check_report(request)  # every number range-checked before anything is recorded
        if report.metrics and self._evaluation_mode != "clear":
            # per-site metrics are an oracle on a site's data: only when the job asks for them in the clear
            raise MalformedMessage(f"metrics: per-site metrics are not accepted by this job (evaluation "
                                   f"{self._evaluation_mode!r}; they travel only as secure sums)")
        with self._cond:
            client = self._session(caller, request.header, "ReportMetrics")
            header = request.header
            ev = self._evaluation
            if ev is not None and header.round == ev.phase and hmac.compare_digest(header.round_nonce, ev.nonce):
                if caller not in ev.participants:
                    raise PermissionDenied("ReportMetrics: you were not asked to evaluate the final model")
                if caller in ev.reported:
                    raise Replayed("ReportMetrics: already received for the final evaluation")
                if request.model_version != ev.version:
                    raise MalformedMessage(f"model_version: expected {ev.version}, got {request.model_version}")
                self.store.record_evaluation(self.run_id, ev.version, caller, report.num_examples, report.metrics)
                ev.reported.add(caller)
                self._cond.notify_all()
                return pb.Ack(round=ev.phase, stage=pb.STAGE_EVALUATION, detail="accepted")
            rnd, _sid = self._round_for_metrics(client, header)
            if caller in rnd.evaluated:
                raise Replayed(f"ReportMetrics: already received for round {rnd.number}")
            if request.model_version != self.model.version:
                raise MalformedMessage(f"model_version: expected {self.model.version}, got {request.model_version}")
            privacy, ledger = self._reported_spend(rnd.number, caller, report)
            # stored in one transaction, and only then marked received: a failed store leaves the retry possible
            self.store.record_client_report(
                self.run_id, model_version=self.model.version, round_number=rnd.number, client_name=caller,
                num_examples=report.num_examples, metrics=report.metrics, privacy=privacy,
                ledger_json=ledger.to_json() if ledger is not None else None,
            )
            if ledger is not None:
                self.model.ledger = ledger
            rnd.evaluated.add(caller)
            return pb.Ack(round=rnd.number, stage=rnd.stage.wire, detail="accepted")  # type: ignore[arg-type]

    def _reported_spend(
        self, round_number: int, caller: str, report: CheckedReport
    ) -> tuple[dict[str, Any] | None, PrivacyLedger | None]:
        """A site's reported DP-SGD spend, checked against what the server knows (``fedveil.server.reports``):
        the row to store (labelled as reported, with the verdict) and a copy of the ledger with the spend."""
        spend = report.privacy
        if spend is None:
            return None, None
        cfg = self.config
        context = SpendContext(
            delta=cfg.dp_delta,
            noise_multiplier=cfg.dp_local_noise_multiplier if cfg.dp == "local" and not cfg.dp_local_target_epsilon
            else None,
            local_epochs=max(cfg.local_epochs or self.task.local_epochs, 1),
        )
        verdict = verify_spend(spend, report.num_examples, self.model.client_events(caller), context,
                               self.model.verifier())
        if not verdict.verified:
            log.warning("round %d: the privacy spend %s reported is unverified: %s", round_number, caller,
                        "; ".join(verdict.reasons))
        event = spend.event()
        ledger = None if event is None else self.model.ledger_with_client_spend(
            round_number, caller, event, ledger_details(verdict))
        return spend_record(spend, report.num_examples, verdict, ledger is not None), ledger

    def _round_for_metrics(self, client: _Client, header: pb.RequestHeader) -> tuple[_Round, int]:
        rnd = self._round
        if len(header.round_nonce) != ROUND_NONCE_BYTES:
            raise MalformedMessage(
                f"header.round_nonce: expected {ROUND_NONCE_BYTES} bytes, got {len(header.round_nonce)}"
            )
        if rnd is None or header.round != rnd.number or not hmac.compare_digest(header.round_nonce, rnd.nonce):
            if header.round_nonce in self._past_nonces:
                raise StageClosed(f"ReportMetrics: round {header.round} is over")
            raise OutOfOrder(f"ReportMetrics: round {header.round} with this nonce is not running")
        sid = rnd.cohort.get(client.name)
        if sid is None:
            raise PermissionDenied(f"ReportMetrics: {client.name!r} is not in the cohort of round {rnd.number}")
        return rnd, sid

    # ------------------------------------------------------------------------------------------
    # Instructions
    # ------------------------------------------------------------------------------------------
    def _wait_reason(self, client: _Client) -> str:
        rnd = self._round
        if rnd is not None:
            if client.name in rnd.cohort:
                return f"round {rnd.number}: waiting for other clients at stage {rnd.stage.label}"
            return f"round {rnd.number} is running without you"
        return f"waiting for a cohort ({self._available_count()} of {self.config.clients_per_round} connected)"

    def _model_entry(self) -> tuple[int, pb.Model, pb.Model, bytes]:
        if self._model_cache is None or self._model_cache[0] != self.model.version:
            full = model_message(self.model.params, self.model.version,
                                 [(t.name, t.shape) for t in self.model_spec.tensors])
            stripped = pb.Model(version=full.version, tensors=full.tensors, sha256=full.sha256,
                                size_bytes=full.size_bytes)
            self._model_cache = (self.model.version, full, stripped, full.data)
        return self._model_cache

    def _model_pb(self) -> pb.Model:
        entry = self._model_entry()
        return entry[1] if self.inline_model else entry[2]

    def _instruction_for(self, client: _Client) -> pb.PollResponse | None:
        if client.pending_result is not None:
            result, client.pending_result = client.pending_result, None
            return pb.PollResponse(round_result=result)
        if self._done is not None:
            client.job_done_sent = True
            self._cond.notify_all()
            return pb.PollResponse(job_done=self._done)
        ev = self._evaluation
        if ev is not None:
            if client.name in ev.participants and client.name not in ev.reported:
                return pb.PollResponse(evaluate=pb.Evaluate(
                    round=ev.version, model=self._model_pb(), deadline_unix_ms=int(ev.deadline_wall * 1000),
                    round_nonce=ev.nonce, phase=ev.phase,
                ))
            return None
        rnd = self._round
        if rnd is None or client.name not in rnd.cohort or client.name in rnd.dropped or rnd.closing:
            return None
        sid = rnd.cohort[client.name]
        done = rnd.submitted.get(client.name, set())
        if rnd.stage in done or sid not in rnd.expected:
            return None
        deadline_ms = int(rnd.deadline_wall * 1000)
        if rnd.stage == Stage.COMMIT:
            return pb.PollResponse(round_start=self._round_start(rnd, sid))
        if rnd.stage == Stage.REVEAL:
            return pb.PollResponse(commitments=pb.Commitments(
                round=rnd.number, deadline_unix_ms=deadline_ms,
                commitments=[pb.SeedCommitment(client_id=c, commitment=v) for c, v in sorted(rnd.commitments.items())]))
        if rnd.stage == Stage.TRAINING:
            return pb.PollResponse(contributions=pb.Contributions(
                round=rnd.number, deadline_unix_ms=deadline_ms,
                reveals=[pb.SeedReveal(client_id=c, contribution=v) for c, v in sorted(rnd.beacon.reveals.items())]))
        out = rnd.outgoing.get(sid)
        if isinstance(out, sa.ShareKeysRequest):
            keys = [
                pb.AdvertisedKeys(client_id=a.client_id, encryption_public_key=a.share_public,
                                  masking_public_key=a.mask_public, signature=a.signature,
                                  identity_public_key=self._identity_key(rnd.names[a.client_id]))
                for a in out.advertisements
            ]
            return pb.PollResponse(peer_keys=pb.PeerKeys(round=rnd.number, keys=keys, deadline_unix_ms=deadline_ms))
        if isinstance(out, sa.MaskedInputRequest):
            shares = [pb.EncryptedShare(peer_id=s, ciphertext=box) for s, box in sorted(out.boxes.items())]
            return pb.PollResponse(incoming_shares=pb.IncomingShares(round=rnd.number, shares=shares,
                                                                     deadline_unix_ms=deadline_ms))
        if isinstance(out, sa.ConsistencyCheckRequest):
            return pb.PollResponse(survivor_check=pb.SurvivorCheck(
                round=rnd.number, survivors=[int(v) for v in out.survivors], deadline_unix_ms=deadline_ms))
        if isinstance(out, sa.UnmaskingRequest):
            return pb.PollResponse(unmasking=pb.UnmaskingRequest(
                round=rnd.number, survivors=[int(v) for v in out.survivors], dropped=[int(v) for v in out.dropped],
                signatures=[pb.SurvivorSignature(client_id=c, signature=s) for c, s in sorted(out.signatures.items())],
                deadline_unix_ms=deadline_ms,
            ))
        return None

    def _identity_key(self, name: str) -> bytes:
        client = self._clients.get(name)
        if client is not None and client.identity_key:
            return client.identity_key
        return self.store.identity_key(name) or b""

    def _round_start(self, rnd: _Round, sid: int) -> pb.RoundStart:
        cfg = self.config
        plan = rnd.plan
        sc = rnd.config
        return pb.RoundStart(
            run_id=self.run_id, round=rnd.number, round_nonce=rnd.nonce, client_id=sid, model=self._model_pb(),
            encoding=plan.encoding,
            secagg=pb.SecAggParams(
                graph=sc.graph.kind, degree=sc.graph.degree, threshold=sc.threshold, active_adversary=sc.active,
                cohort_size=sc.num_clients, cohort=list(range(sc.num_clients)), round_id=sc.round_id,
                context=sc.context, identity_keys=list(sc.identity_keys or ()),
                identity_credentials=[self._credential(rnd.names[i]) for i in range(sc.num_clients)]
                if sc.active else [],
                max_corrupt_fraction=sc.max_corrupt_fraction,
            ),
            dp=plan.dp,
            training=pb.TrainingParams(
                local_epochs=cfg.local_epochs or self.task.local_epochs,
                learning_rate=cfg.learning_rate or self.task.learning_rate,
                batch_size=cfg.batch_size or self.task.batch_size,
                evaluate_global_model=cfg.evaluate and self._evaluation_mode == "clear",
                seed=round_seed(self.seed, rnd.number),
            ),
            deadline_unix_ms=int(rnd.deadline_wall * 1000),
            stage_timeout_ms=int(cfg.stage_timeout * 1000),
            attempt=rnd.attempt,
            purpose=rnd.purpose,  # type: ignore[arg-type]
        )

    def _credential(self, name: str) -> bytes:
        client = self._clients.get(name)
        return client.credential if client is not None else b""

    # ------------------------------------------------------------------------------------------
    # The driver
    # ------------------------------------------------------------------------------------------
    def _available(self) -> list[str]:
        now = self._clock()
        window = self.config.poll_wait + 5.0
        return sorted(c.name for c in self._clients.values()
                      if not c.disconnected and (c.polling > 0 or now - c.last_seen <= window))

    def _available_count(self) -> int:
        return len(self._available())

    def stop(self) -> None:
        """Ask :meth:`run` to stop at the next opportunity (the store stays consistent)."""
        self._stop_event.set()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _wait_until(self, predicate: Callable[[], bool], deadline: float | None) -> bool:
        """Wait (lock held) until ``predicate`` or the deadline; False if stopping."""
        while not predicate():
            if self._stop_event.is_set():
                return False
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return True
                self._cond.wait(min(remaining, 0.5))
            else:
                self._cond.wait(0.5)
        return True

    def _threshold(self, n: int) -> ThresholdPlan:
        """Masking graph and threshold for a cohort of ``n`` (the collusion rule, via the config)."""
        try:
            return self.config.secagg_plan(n)
        except ConfigError as err:  # an explicit --threshold that a smaller cohort cannot use safely
            raise JobError(f"--threshold: {str(err).removeprefix('threshold: ')} (cohort of {n})") from None

    def _wait_for_cohort(self, number: int) -> list[str] | None:
        cfg = self.config
        ready_since: float | None = None
        while not self._stop_event.is_set():
            barred = self._barred.get(number, set())
            avail = [n for n in self._available() if n not in barred]
            if len(avail) >= cfg.clients_per_round:
                return avail
            if len(avail) >= cfg.min_clients:
                now = self._clock()
                ready_since = ready_since if ready_since is not None else now
                if now - ready_since >= cfg.cohort_wait:
                    return avail
            else:
                ready_since = None
            self._cond.wait(0.25)
        return None

    def _start_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> _Round:
        cfg = self.config
        attempt = self._attempts.get(number, 0) + 1
        self._attempts[number] = attempt
        self._tries[number] = self._tries.get(number, 0) + 1
        k = min(cfg.clients_per_round, len(available))
        if k == len(available):
            chosen = sorted(available)
        elif cfg.insecure_deterministic:  # reproducible cohorts: anyone with the job seed can predict them
            rng = np.random.default_rng([self.seed, number, attempt])
            chosen = sorted(str(c) for c in rng.choice(available, k, replace=False))
        else:  # secret randomness: what amplification by sampling relies on
            chosen = sorted(secrets.SystemRandom().sample(sorted(available), k))
        cohort = {name: i for i, name in enumerate(chosen)}
        secagg_plan = self._threshold(len(chosen))
        spec, t = secagg_plan.spec, secagg_plan.threshold
        if cfg.insecure_deterministic:  # tests and bit-for-bit simulations only: predictable by anyone with the seed
            nonce = hashlib.sha256(f"fedveil/nonce/{self.seed}/{number}/{attempt}/{purpose}".encode()).digest()[
                :ROUND_NONCE_BYTES]
        else:
            nonce = os.urandom(ROUND_NONCE_BYTES)
        round_id = int.from_bytes(hashlib.sha256(self.run_id.encode() + struct.pack("<II", number, attempt) + nonce)
                                  .digest()[:8], "little")
        context = f"fedveil/{self.run_id}/{self.task.name}".encode()
        evaluation_only = purpose == pb.ROUND_PURPOSE_EVALUATE
        plan = self.model.plan(number, len(chosen), t, context, evaluation_only=evaluation_only,
                               metrics=self._secure_metrics() if (cfg.evaluate or evaluation_only) else ())
        identity_keys = None
        if cfg.active_adversary:
            keys = [self._identity_key(n) for n in chosen]
            missing = [n for n, key in zip(chosen, keys, strict=True) if len(key) != PUBLIC_KEY_BYTES]
            if missing:
                raise JobError(f"--active-adversary: clients without an enrolled identity key: {', '.join(missing)}")
            identity_keys = tuple(keys)
        sconfig = SecAggConfig(
            num_clients=len(chosen), threshold=t, vector_length=plan.dimension, round_id=round_id,
            ring_bits=plan.ring_bits, graph=spec, active=cfg.active_adversary, identity_keys=identity_keys,
            context=bound_context(context, plan.dp, plan.encoding),  # sites shown other DP parameters: no session
            max_corrupt_fraction=cfg.max_corrupt_fraction,
            # a placeholder until the cohort's commit-then-reveal seed is known (REVEAL closes)
            graph_seed=bytes(32),
        )
        now, wall = self._clock(), time.time()
        rnd = _Round(number=number, attempt=attempt, nonce=nonce, plan=plan, config=sconfig,
                     beacon=BeaconCollector(round_id, tuple(range(len(chosen))), t),
                     cohort=cohort, names={i: n for n, i in cohort.items()}, started_wall=wall, purpose=purpose,
                     deadline=now + cfg.stage_timeout, deadline_wall=wall + cfg.stage_timeout)
        self.store.start_round(self.run_id, number, attempt, cohort, t)
        log.info("round %d (attempt %d%s): cohort of %d, dimension %d, secure aggregation %s",
                 number, attempt, ", evaluation only" if purpose == pb.ROUND_PURPOSE_EVALUATE else "", len(chosen),
                 plan.dimension, secagg_plan.describe())
        return rnd

    def _finish_round_for_clients(self, rnd: _Round, outcome: int, reason: str, survivors: tuple[int, ...]) -> None:
        survivor_names = {rnd.names[s] for s in survivors}
        for name in rnd.cohort:
            client = self._clients.get(name)
            if client is None:
                continue
            if outcome == pb.ROUND_OUTCOME_COMPLETED and name not in survivor_names:
                client.pending_result = pb.RoundResult(round=rnd.number, outcome=pb.ROUND_OUTCOME_DROPPED,
                                                       reason="your input is not in the sum (missed a deadline)",
                                                       survivors=len(survivors), new_model_version=self.model.version)
            else:
                client.pending_result = pb.RoundResult(round=rnd.number, outcome=outcome, reason=reason,  # type: ignore[arg-type]
                                                       survivors=len(survivors), new_model_version=self.model.version)
        self._past_nonces.add(rnd.nonce)
        self._round = None
        self._cond.notify_all()

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        """One round attempt: 'completed', 'aborted', 'withheld' (a member withheld its graph-seed
        reveal: retried without it), 'budget' or 'stopped'."""
        with self._cond:
            rnd = self._start_round(number, available, purpose)
            try:
                if purpose == pb.ROUND_PURPOSE_TRAIN:
                    # q over the sites the cohort was really drawn from (issue 10: never the enrolled count)
                    self.model.reserve_budget(rnd.plan, len(available),
                                              amplification=self.config.dp_sampling_amplification)
            except BudgetExceededError as err:
                self.store.abort_round(self.run_id, number, rnd.attempt, f"privacy budget: {err}", None)
                self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, f"privacy budget exhausted: {err}", ())
                self._budget_message = str(err)
                return "budget"
            # the first stage's deadline runs from when the cohort can see the round (reserving the
            # budget above may take a while: an accountant's first computation)
            now, wall = self._clock(), time.time()
            rnd.deadline, rnd.deadline_wall = now + self.config.stage_timeout, wall + self.config.stage_timeout
            self._round = rnd
            self._cond.notify_all()
        self.listeners.emit(RoundStarted(self.run_id, number, rnd.attempt, tuple(rnd.cohort),
                                         "evaluate" if purpose == pb.ROUND_PURPOSE_EVALUATE else "train"))
        stages = [Stage.COMMIT, Stage.REVEAL, Stage.TRAINING, Stage.SHARE_KEYS, Stage.MASKED_INPUT]
        if self.config.active_adversary:
            stages.append(Stage.CONSISTENCY)
        stages.append(Stage.UNMASKING)
        for index, stage in enumerate(stages):
            with self._cond:
                if not self._wait_until(lambda: not rnd.live_pending(), rnd.deadline):
                    self._abandon(rnd, "server stopping")
                    return "stopped"
                missing = [rnd.names[s] for s in rnd.pending]
                rnd.closing = True
                for name in missing:
                    rnd.dropped.setdefault(name, (stage.label, "missed the stage deadline"))
            if stage == Stage.COMMIT:
                listed = rnd.beacon.close_commit()
                outgoing: dict[int, sa.Message] = {}
                aborted = listed is None
            elif stage == Stage.REVEAL:
                seed = rnd.beacon.close_reveal()
                aborted = seed is None
                if seed is not None:
                    rnd.config = dataclasses.replace(rnd.config, graph_seed=seed)
                    rnd.secagg = SecAggServer(rnd.config)
            else:
                assert rnd.secagg is not None
                outgoing = rnd.secagg.close_stage()  # outside the lock: unmasking is the heavy part
                aborted = rnd.secagg.aborted
            with self._cond:
                answered = [n for n in rnd.cohort if stage in rnd.submitted.get(n, set())]
                self.store.record_stage(self.run_id, number, rnd.attempt, answered, stage.label)
                new_drops = {n: rnd.dropped[n] for n in missing if n not in rnd.recorded}
                rnd.recorded.update(new_drops)
                if new_drops:
                    self.store.record_dropouts(self.run_id, number, rnd.attempt, new_drops)
                    self._dropouts += len(new_drops)
                    log.info("round %d: %d dropout(s) at %s: %s", number, len(new_drops), stage.label,
                             ", ".join(sorted(new_drops)))
                if aborted:
                    return self._abort_attempt(rnd, stage, len(answered))
                if rnd.secagg is not None and rnd.secagg.completed:
                    break
                if stage == Stage.COMMIT:
                    assert listed is not None
                    rnd.commitments = listed
                    for sid in range(len(rnd.names)):  # not in U0: out of the round for good
                        if sid not in listed:
                            rnd.dropped.setdefault(rnd.names[sid], (stage.label, "did not accept the round"))
                rnd.stage = stages[index + 1]
                rnd.outgoing = outgoing
                timeout = self.config.round_timeout if rnd.stage == Stage.TRAINING else self.config.stage_timeout
                now, wall = self._clock(), time.time()
                rnd.deadline, rnd.deadline_wall = now + timeout, wall + timeout
                rnd.closing = False
                self._cond.notify_all()
        assert rnd.secagg is not None
        result = rnd.secagg.result
        declared = sum(rnd.weights.get(s, 0.0) for s in result.survivors) if rnd.plan.encoding.weighted else None
        try:
            applied = self.model.apply(rnd.plan, result.ring_sum, len(result.survivors), declared)
        except AggregateRejected as err:
            return self._reject_round(rnd, str(err), len(result.survivors))
        if purpose == pb.ROUND_PURPOSE_EVALUATE:
            with self._cond:
                self._record_secure_evaluation(rnd, applied.evaluation, len(result.survivors))
                self.store.finish_evaluation_round(self.run_id, number, rnd.attempt, len(result.survivors))
                self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_COMPLETED, "evaluation", result.survivors)
            return "completed"
        state_after = self.model.state_dict(applied)
        ledger_json = self.model.ledger.to_json() if self.model.ledger is not None else None
        stats = {**applied.stats, "dropped": [rnd.names[d] for d in result.dropped], "threshold": rnd.plan.threshold,
                 "duration_s": round(time.time() - rnd.started_wall, 3)}
        self.store.complete_round(
            self.run_id, number, rnd.attempt, survivors=len(result.survivors), aggregate=applied.aggregate,
            aggregate_digest=applied.aggregate_digest, model=applied.params, state=state_after,
            ledger_json=ledger_json, stats=stats,
        )
        with self._cond:
            if applied.evaluation is not None:
                self._record_secure_evaluation(rnd, applied.evaluation, len(result.survivors))
            self.model.commit(applied)
            log.info("round %d completed: %d survivors, update norm %.4g, %.2fs", number, len(result.survivors),
                     applied.stats["update_norm"], stats["duration_s"])
            self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_COMPLETED, "", result.survivors)
        self.listeners.emit(RoundCompleted(self.run_id, number, rnd.attempt, len(result.survivors), applied.params,
                                           ledger_json, dict(stats)))
        return "completed"

    def _reject_round(self, rnd: _Round, reason: str, survivors: int) -> str:
        """The unmasked sum is not one honest sites can produce: skip the round (model unchanged, the
        round counted, its release kept in the ledger) and go on — a retry would let a malicious site
        stall the job."""
        number = rnd.number
        state_after = self.model.state_dict(skipping=True)
        ledger_json = self.model.ledger.to_json() if self.model.ledger is not None else None
        self.store.complete_round(
            self.run_id, number, rnd.attempt, survivors=survivors, aggregate=np.zeros(0, np.float32),
            aggregate_digest="", model=self.model.params, state=state_after, ledger_json=ledger_json,
            stats={"rejected": reason, "threshold": rnd.plan.threshold}, status="rejected", reason=reason)
        with self._cond:
            self.model.skip()
            self._rejected_rounds += 1
            log.warning("round %d rejected (model unchanged, the job goes on): %s", number, reason)
            self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, f"rejected: {reason}", ())
        self.listeners.emit(RoundRejected(self.run_id, number, rnd.attempt, reason))
        return "rejected"

    def _abort_attempt(self, rnd: _Round, stage: Stage, answered: int) -> str:
        """Record an aborted attempt (lock held). Once masked inputs were in and unmasking shares
        were asked for, the sum could have been released: under DP the attempt stays in the ledger
        as a release (Bonawitz et al.'s retries are new releases, not refunds)."""
        number = rnd.number
        if rnd.secagg is not None:
            reason = rnd.secagg.abort_reason or "aborted"
        else:
            reason = rnd.beacon.abort_reason or "aborted"
        released = stage >= Stage.CONSISTENCY
        if released:
            reason += " (after masked inputs: counted as a release in the privacy ledger)"
            if self.model.ledger is not None:
                self.store.save_ledger(self.run_id, self.model.ledger.to_json())
        elif rnd.purpose == pb.ROUND_PURPOSE_TRAIN:
            self.model.cancel_budget(number)
        self.store.abort_round(self.run_id, number, rnd.attempt, reason, answered)
        self._aborted_attempts += 1
        log.warning("round %d attempt %d aborted: %s", number, rnd.attempt, reason)
        self.listeners.defer(RoundAborted(self.run_id, number, rnd.attempt, stage.label, reason))
        self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, reason, ())
        if stage == Stage.REVEAL and rnd.beacon.withheld:
            # each withholder costs one attempt and is barred from the rest of the round, so a site
            # cannot make a round fail by withholding; this attempt does not count against the limit
            barred = self._barred.setdefault(number, set())
            barred.update(rnd.names[s] for s in rnd.beacon.withheld)
            self._tries[number] -= 1
            return "withheld"
        return "aborted"

    def _record_secure_evaluation(self, rnd: _Round, evaluation: tuple[dict[str, float], float] | None,
                                  survivors: int) -> None:
        if evaluation is None:
            return
        metrics, examples = evaluation
        if not metrics:
            return
        self.store.record_evaluation(self.run_id, self.model.version, SECURE_SUM_ROW, round(examples), metrics)
        self._last_secure_metrics = dict(metrics)
        self.listeners.defer(EvaluationRecorded(self.run_id, rnd.number, self.model.version, dict(metrics), examples))
        log.info("round %d: secure evaluation of model %d over %d sites: %s", rnd.number, self.model.version,
                 survivors, {k: round(v, 4) for k, v in metrics.items()})

    def _abandon(self, rnd: _Round, reason: str) -> None:
        if rnd.purpose == pb.ROUND_PURPOSE_TRAIN:
            self.model.cancel_budget(rnd.number)
        self.store.abort_round(self.run_id, rnd.number, rnd.attempt, reason, None)
        self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, reason, ())

    def _secure_final_evaluation(self) -> None:
        """The final model's metrics as one secure sum over the cohort (an evaluation-only round)."""
        cfg = self.config
        phase = cfg.rounds + 1
        for _ in range(min(cfg.max_round_attempts, cfg.max_evaluations_per_job)):  # each attempt asks again
            with self._cond:
                available = [n for n in self._available() if n not in self._barred.get(phase, set())]
            if len(available) < cfg.min_clients:
                log.info("final evaluation skipped: %d sites connected, fewer than %d", len(available),
                         cfg.min_clients)
                return
            outcome = self._run_round(phase, available, purpose=pb.ROUND_PURPOSE_EVALUATE)
            self.listeners.flush()
            if outcome in ("completed", "stopped"):
                break
        self._final_metrics = dict(self._last_secure_metrics)
        log.info("final evaluation of model %d (secure sum): %s", self.model.version, self._final_metrics)

    def _final_evaluation(self) -> None:
        cfg = self.config
        with self._cond:
            participants = set(self._available())
            if not participants:
                return
            now, wall = self._clock(), time.time()
            ev = _Evaluation(version=self.model.version, nonce=os.urandom(ROUND_NONCE_BYTES), phase=cfg.rounds + 1,
                             deadline=now + cfg.stage_timeout, deadline_wall=wall + cfg.stage_timeout,
                             participants=participants)
            self._evaluation = ev
            self._cond.notify_all()
            self._wait_until(lambda: ev.reported >= ev.participants, ev.deadline)
            self._evaluation = None
            self._past_nonces.add(ev.nonce)
        rows = self.store.evaluations(self.run_id, ev.version)
        self._final_metrics = weighted_metrics(rows)
        log.info("final evaluation of model %d by %d client(s): %s", ev.version, len(rows), self._final_metrics)

    def run(self) -> JobSummary:
        """Run the job to completion (or until :meth:`stop`); returns the summary."""
        cfg = self.config
        status = "completed"
        message = ""
        self._budget_message = ""
        if self.finished is not None:
            return self._report_finished()
        while self.model.version < cfg.rounds:
            with self._cond:
                available = self._wait_for_cohort(self.model.version + 1)
            if available is None:
                status, message = "stopped", "stopped before the job completed; restart with the same command"
                break
            number = self.model.version + 1
            try:
                outcome = self._run_round(number, available)
            except JobError:
                raise
            except Exception:  # a bug or a store failure: abort this attempt, keep the server up
                log.exception("round %d: unexpected error; the attempt is aborted", number)
                with self._cond:
                    rnd = self._round
                    if rnd is not None:
                        try:
                            self._abandon(rnd, "internal server error (logged)")
                        except Exception:
                            log.exception("round %d: could not record the abort", number)
                            self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, "internal error", ())
                    self._aborted_attempts += 1
                outcome = "aborted"
            self.listeners.flush()
            if outcome == "stopped":
                status, message = "stopped", "stopped before the job completed; restart with the same command"
                break
            if outcome in ("withheld", "rejected"):
                continue
            if outcome == "budget":
                status, message = "budget_exhausted", f"stopped early: {self._budget_message}"
                break
            if outcome == "aborted" and self._tries.get(number, 0) >= cfg.max_round_attempts:
                status = "failed"
                message = f"round {number} aborted {cfg.max_round_attempts} times (see the store for reasons)"
                break
        if status in ("completed", "budget_exhausted") and cfg.final_evaluation and cfg.max_evaluations_per_job \
                and not self._stop_event.is_set():
            if self._evaluation_mode == "secure":
                self._secure_final_evaluation()
            elif self._evaluation_mode == "clear":
                self._final_evaluation()
        if status == "completed" and not message:
            message = f"completed {self.model.version} rounds" + (
                f" (resumed after round {self.resumed_from})" if self.resumed_from else "")
        ledger = self.model.ledger
        epsilon = ledger.epsilon() if ledger is not None and cfg.user_level_dp else None
        summary = JobSummary(
            run_id=self.run_id, status=status, completed_rounds=self.model.version, total_rounds=cfg.rounds,
            resumed_from=self.resumed_from, aborted_attempts=self._aborted_attempts, dropouts=self._dropouts,
            final_metrics=self._final_metrics, epsilon=epsilon, delta=cfg.dp_delta if epsilon is not None else None,
            message=message, rejected_rounds=self._rejected_rounds,
        )
        if status != "stopped":
            self.store.finish_run(self.run_id, status, summary.to_dict())
        self.listeners.emit(JobFinished(self.run_id, summary.to_dict()))
        if status != "stopped":
            self._announce_done(message)
        return summary

    def _announce_done(self, message: str) -> None:
        """Tell every client the job is over; wait up to ``linger`` seconds for them to hear it."""
        with self._cond:
            self._done = pb.JobDone(
                run_id=self.run_id, completed_rounds=self.model.version,
                final_metrics=[pb.Metric(name=k, value=v) for k, v in self._final_metrics.items()],
                summary=message,
            )
            self._cond.notify_all()
            linger_until = self._clock() + self.config.linger
            self._wait_until(
                lambda: all(c.job_done_sent for c in self._clients.values() if c.name in self._available()),
                linger_until,
            )

    def _report_finished(self) -> JobSummary:
        data = self.finished or {}
        self._final_metrics = {str(k): float(v) for k, v in (data.get("final_metrics") or {}).items()}
        message = f"run {self.run_id} had already finished: {data.get('message', '')}".strip()
        summary = JobSummary(
            run_id=self.run_id, status=str(data.get("status", "completed")), completed_rounds=self.model.version,
            total_rounds=self.config.rounds, resumed_from=self.model.version,
            aborted_attempts=self._aborted_attempts, dropouts=self._dropouts, final_metrics=self._final_metrics,
            epsilon=data.get("epsilon"), delta=data.get("delta"), message=message,
        )
        self._announce_done(message)
        return summary

