"""The coordinator's state and the types its parts share; see :mod:`fedveil.server.coordinator` for the design."""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedveil.errors import FedveilError
from fedveil.metrics import DEFAULT_METRICS
from fedveil.model_spec import ModelSpec
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage
from fedveil.protocol.model_delivery import ModelDelivery, PublishedModel
from fedveil.protocol.revocation_file import RevocationFile
from fedveil.secagg import errors as sa_errors
from fedveil.secagg import messages as sa
from fedveil.secagg.beacon import BeaconCollector
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.identity import RevocationList, SiteCredential
from fedveil.secagg.server import SecAggServer
from fedveil.server.config import ServerConfig
from fedveil.server.events import (
    JobListener,
    Listeners,
)
from fedveil.server.round_plan import RoundPlan
from fedveil.server.store import RunStore
from fedveil.server.training import GlobalModel
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


STEERED_RETURNS_PER_S = 100.0
"""Pace steering spreads the returns of the sites it sends away so that they come back at about
this rate at most: over ``max(1.25 poll waits, joined sites / rate)``."""

MAX_STEER_S = 120.0
"""Pace steering (:meth:`SessionsMixin._busy_wait`): the longest a site outside the running round is
sent away for. Kept below the clients' own cap on a server's retry_after
(:data:`fedveil.clients.session.MAX_RETRY_AFTER_S`)."""


SECURE_SUM_ROW = "(secure sum)"


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
    last_polled: float = float("-inf")
    """When its latest Poll was held or answered. Only a site that asks for work is drawn: one that only
    joined, or only makes other calls (reports, uploads), would miss the round it was drawn for."""
    num_examples: int = 0
    identity_key: bytes = b""
    polling: int = 0
    poll_token: object | None = None
    pending_result: pb.RoundResult | None = None
    job_done_sent: bool = False
    disconnected: bool = False
    credential: bytes = b""
    trust_server: bool = False
    evaluates: bool = False
    """It said at Join that it fills secure evaluation sums (``JoinRequest.evaluates``); a site that does not
    declines a round that asks for them, so the server asks only cohorts of sites that do."""
    evaluates_under_local_dp: bool = False
    back_by: float = float("-inf")
    """When the server asked this site to poll again, having sent it away from a full poll budget."""
    vouched: SiteCredential | None = None
    """The credential as the server verified it at Join (None where it had no authority to verify it
    with): checked again, for expiry and revocation, at every cohort draw."""
    refused: str = ""
    """Why the server closed this session (its credential expired or was revoked since Join): it is
    not drawn again, and its next call is told why."""


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
    started: float = 0.0
    """The coordinator's clock when the round was announced."""
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
    broadcasts: dict[Stage, Any] = field(default_factory=dict)
    """The stage's list that every member is sent alike (the commitments, the reveals, the advertised
    keys), built once per stage rather than once per member's poll (n members, n entries each)."""
    gone: dict[str, str] = field(default_factory=dict)
    """Members whose host saw their session end for good, and why (:meth:`SessionsMixin.site_gone`)."""
    roster_credentials: tuple[bytes, ...] = ()
    """Active mode: each member's credential as the roster shows it, fixed when the round opens (the
    entry a decline names, :mod:`.refusal_tally`)."""
    identity_keys: dict[int, bytes] = field(default_factory=dict)
    """Each member's identity key as first looked up for the round's key lists (k per member)."""
    refusals: dict[int, frozenset[int]] = field(default_factory=dict)
    """Decliner's slot → the slots whose credential or identity key it refused, from declines at
    COMMIT (``RoundResponse.refused_members``; :mod:`.refusal_tally`)."""

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
    site_epsilon: dict[str, float] = field(default_factory=dict)
    """Sample-level ε per site (local DP): the server's computation from the DP-SGD parameters each
    site reported (:mod:`fedveil.server.privacy_view`), at the job's δ."""
    unverified_sites: tuple[str, ...] = ()
    """Sites whose reports the server could not check (their ε is the site's claim only)."""
    convicted: dict[str, str] = field(default_factory=dict)
    """Sites a share-box complaint proved at fault → why; they were left out of the rest of the run."""
    barred: dict[str, str] = field(default_factory=dict)
    """Sites enough members declined for their credential or identity key → why; they were not drawn
    again while they presented that entry."""
    bars_lifted: tuple[str, ...] = ()
    """Barred sites that, at the job's end, presented another credential or key: their bar had lifted."""
    out_of_budget: dict[str, str] = field(default_factory=dict)
    """Sites that declined a round because their own privacy budget could not afford it → why; they
    were not drawn again in this run."""

    @property
    def max_site_epsilon(self) -> float | None:
        """The largest site's sample-level ε (None when no site reported local DP)."""
        return max(self.site_epsilon.values()) if self.site_epsilon else None

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
            "site_epsilon": dict(self.site_epsilon),
            "max_site_epsilon": self.max_site_epsilon,
            "unverified_sites": list(self.unverified_sites),
            "convicted": dict(self.convicted),
            "barred": dict(self.barred),
            "bars_lifted": list(self.bars_lifted),
            "out_of_budget": dict(self.out_of_budget),
        }


def _credential_serial(raw: bytes) -> str:
    try:
        return SiteCredential.decode(raw).serial.hex()[:16]
    except sa_errors.SecAggError:
        return "?"


def _metrics_dict(items: Any) -> dict[str, float]:
    return {m.name: float(m.value) for m in items}


class CoordinatorBase:
    """The state every part of the coordinator shares (one lock, one condition)."""

    _uploads: UploadBook | None = None

    def __init__(
        self,
        config: ServerConfig,
        task: Task,
        store: RunStore,
        *,
        new_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[JobListener] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        config.check_serving()
        self.config = config
        self.listeners = Listeners(listeners)
        """Told of every round and of the job's end (:mod:`fedveil.server.events`); add with ``.add``."""
        self.task = task
        self.store = store
        self._clock = clock
        self._wall_clock = wall_clock
        """Unix time, for the validity windows of the sites' credentials (a test may move it)."""
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
        self._last_round_s: float | None = None
        """How long the last completed round took, announcement to release (pace steering's estimate)."""
        self.max_waiting_polls: int | None = None
        """Cap on polls held at once (the gRPC runner sets it below its worker count, so long polls
        can never occupy every worker and stall the submissions of a round)."""
        self.resumed_from = 0
        self._rejected_rounds = 0
        self._model_released_unchanged = False
        """A round was rejected or skipped after its release: the global model is one the sites released a
        sum over, so no evaluation is asked until it changes (sites that evaluate would decline)."""
        self._released_unchanged: dict[str, str] = {}
        """Sites that released a sum over the unchanged model and decline a replay of it (no noise they rely
        on covers a second release) → why: left out of cohorts until the model changes."""
        self._cannot_evaluate: set[str] = set()
        """Sites that said their evaluation gave a metric they cannot sum (``RoundResponse.cannot_evaluate``):
        kept by name, so a reconnect does not make them sit out another round."""
        self.model_delivery = ModelDelivery.in_messages()
        """How the model reaches the sites (the transport's choice: the gRPC runner has them fetch it
        in chunks, :class:`fedveil.protocol.model_delivery.ModelDelivery`)."""
        self._open_run(new_run)
        self._barred: dict[int, dict[str, str]] = {}
        """round → sites left out of its later attempts → why: they withheld a graph-seed reveal."""
        self._out_of_budget: dict[str, str] = {}
        """Sites that declined for their own privacy budget → why: not drawn again in this process's
        run (a restarted server draws them once more, and they decline again)."""
        self._refused_entries: dict[str, tuple[bytes, str]] = self.store.credential_bars(self.run_id)
        """Sites enough members declined for their credential or identity key → (the digest of that
        roster entry, why): not drawn again in this job while they present the same entry
        (:mod:`.refusal_tally`; kept in the store, so a resumed run keeps the bar)."""
        if self._refused_entries:
            log.warning("run %s: %s stay barred while they present the credential the sites refused", self.run_id,
                        ", ".join(sorted(self._refused_entries)))
        self._convicted: dict[str, str] = self.store.convictions(self.run_id)
        """Sites a share-box complaint proved at fault → why (left out of the rest of the job; kept in
        the store, so a resumed run leaves them out too)."""
        if self._convicted:
            log.warning("run %s: %s stay left out (convicted before the restart)", self.run_id,
                        ", ".join(sorted(self._convicted)))
        self._no_cohort: str | None = None
        """Why no cohort can be drawn for the next round (only barred sites would make it up)."""
        self._last_secure_metrics: dict[str, float] = {}
        self.revocations: RevocationList | None = None
        """The authority's revocation list the operator gave (``--revocations``): checked at Join and
        at every cohort draw (:meth:`SessionsMixin._recheck_credentials`)."""
        self.revocation_file: RevocationFile | None = None
        """The ``--revocations`` file, read again when it changes (:meth:`SessionsMixin.watch_revocations`)."""

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
            ckpt = self.store.latest_checkpoint(self.run_id)
            if ckpt is not None:
                self.model.load(ckpt.model, ckpt.state, self.store.ledger_json(self.run_id))
            self._skip_released_rounds()
            interrupted = self.store.interrupt_unfinished_rounds(self.run_id)
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
            log.info("started run %s: %d rounds of %d clients", self.run_id, self.config.schedule.rounds,
                     self.config.schedule.clients_per_round)
        self._attempts: dict[int, int] = {}  # round → last attempt number in the store (unique ids)
        self._tries: dict[int, int] = {}  # round → attempts since this start (--max-round-attempts)
        for rec in self.store.rounds(self.run_id):
            self._attempts[rec.round] = max(self._attempts.get(rec.round, 0), rec.attempt)
            if rec.status == "aborted":
                self._aborted_attempts += 1
            if rec.status == "rejected" and rec.round == self.model.version:
                # the model held is one the sites released a sum over: no evaluation of it (a resumed server
                # asked for one, and evaluating sites declined: the review of 2026-12-07)
                self._model_released_unchanged = True
        self._dropouts = len(self.store.dropouts(self.run_id))
        self._max_message_bytes = self._compute_max_message_bytes()

    @property
    def _evaluation_mode(self) -> str:
        """Federated evaluation as the job runs it: off where the privacy mechanism rules it out
        (:meth:`PrivacyMechanism.evaluation_refusal`), else the configured mode."""
        evaluation = self.config.evaluation
        if not evaluation.each_round and not evaluation.final:
            return "off"
        return "off" if self.model.mechanism.evaluation_refusal() is not None else evaluation.mode

    def _secure_metrics(self) -> tuple[str, ...]:
        if self._evaluation_mode != "secure":
            return ()
        return tuple(self.task.metrics or DEFAULT_METRICS)

    def _evaluates(self, name: str) -> bool:
        """Whether site ``name`` said it fills secure evaluation sums in this job (lock held)."""
        client = self._clients.get(name)
        if client is None or not client.evaluates or name in self._cannot_evaluate:
            return False
        return self.config.privacy.mode != "local" or client.evaluates_under_local_dp

    @property
    def completed_rounds(self) -> int:
        return self.model.version

    @property
    def job_info(self) -> pb.JobInfo:
        cfg = self.config
        return pb.JobInfo(
            task_name=self.task.name, total_rounds=cfg.schedule.rounds, completed_rounds=self.model.version,
            clients_per_round=cfg.schedule.clients_per_round, min_clients=cfg.schedule.min_clients,
            secagg_graph=cfg.secagg.graph,
            dp_mode=cfg.privacy.mode, active_adversary=cfg.secagg.active_adversary, consortium=cfg.secagg.consortium,
            evaluation=self._evaluation_mode, max_corrupt_fraction=cfg.secagg.max_corrupt_fraction,
            model=self.model_spec.to_proto(),  # type: ignore[arg-type]
        )

    def max_message_bytes(self) -> int:
        """The inbound size limit: the largest legitimate message (a masked input) plus headroom."""
        return self._max_message_bytes

    def _compute_max_message_bytes(self) -> int:
        plan = self.model.plan(1, self.config.schedule.clients_per_round, 2, b"size")
        itemsize = 4 if plan.ring_bits <= 32 else 8
        model_bytes = 4 * self.model.dim
        return max(4 << 20, plan.dimension * itemsize + (1 << 20), model_bytes + (1 << 20))

    if TYPE_CHECKING:  # implemented by the mixins; declared for the type checker
        def _abandon(self, rnd: _Round, reason: str, *, stopping: bool = False) -> None: ...
        def _abort_attempt(self, rnd: _Round, stage: Stage, answered: int) -> str: ...
        def _reject_round(self, rnd: _Round, reason: str, survivors: int) -> str: ...
        def _skip_released_rounds(self) -> None: ...
        def _mark_release(self, rnd: _Round) -> None: ...
        def _record_secure_evaluation(self, rnd: _Round, evaluation: tuple[dict[str, float], float] | None,
                                      survivors: int) -> None: ...
        def _available(self) -> list[str]: ...
        def _drawable(self) -> list[str]: ...
        def _bar_refused_members(self, rnd: _Round) -> bool: ...
        def _connected(self) -> list[_Client]: ...
        def _due_back(self) -> list[_Client]: ...
        def _credential(self, name: str) -> bytes: ...
        def _drop_gone(self, rnd: _Round) -> None: ...
        def _finish_round_for_clients(self, rnd: _Round, outcome: int, reason: str,
                                      survivors: tuple[int, ...]) -> None: ...
        def _identity_key(self, name: str) -> bytes: ...
        def _instruction_for(self, client: _Client) -> pb.PollResponse | None: ...
        def _model_pb(self) -> pb.Model: ...
        def _published_model(self) -> PublishedModel: ...
        def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str: ...
        def _session(self, caller: str, header: pb.RequestHeader, rpc: str, *, consume: bool = True) -> _Client: ...
        def _wait_for_cohort(self, number: int) -> list[str] | None: ...
        def _round_for(self, client: _Client, header: pb.RequestHeader, stage: Stage,
                       rpc: str) -> tuple[_Round, int]: ...
        def _upload_book(self) -> UploadBook: ...
        def _refuse_message(self, rnd: _Round, name: str, stage: Stage, problem: str,
                            reason: str | None = None) -> MalformedMessage: ...
        def _excluded(self, number: int) -> set[str]: ...
        def _draw_pool(self, number: int) -> tuple[list[str], set[str], list[str]]: ...
        def _refused_now(self) -> dict[str, str]: ...
        def _exclusion_reasons(self, number: int) -> str: ...
        def _misconduct_outcome(self, rnd: _Round) -> str | None: ...
        def _convict_unmasking_misconduct(self, rnd: _Round) -> None: ...
        def _lifted_bars(self) -> set[str]: ...
        def _wait_until(self, predicate: Callable[[], bool], deadline: float | None) -> bool: ...
