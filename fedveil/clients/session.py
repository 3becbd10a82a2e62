"""The client's protocol loop: join, poll, train when chosen, take part in secure aggregation.

:class:`Federation` (what :func:`fedveil.clients.federate` returns) is an iterator of
:class:`Round` objects. Each round hands the user's own training loop the current global model
(loaded into the user's own ``nn.Module``); the loop trains it however it likes and calls
:meth:`Round.submit`, which computes the update, clips and encodes it, and runs the
secure-aggregation stages with the server until the round's result is known. Raw data never
leaves the process: only the masked, encoded update does.

Security: nothing is taken on the server's word. Every ``RoundStart`` is checked against the
site's own :class:`~fedveil.clients.policy.SitePolicy` and the ``JobInfo`` it joined
(:func:`fedveil.clients.admission.admit_round`) and declined with a one-line reason when it breaks
them; the Harary layout comes from a commit-then-reveal seed the site helps draw
(:mod:`fedveil.secagg.beacon`); every attempt uses fresh randomness; a round whose unmasking
shares the site released is never joined again; evaluation travels as secure sums; and the site
keeps its own ledger of what it released (:class:`~fedveil.clients.site_state.SiteState`).

Robustness: every call goes through :class:`fedveil.clients.backoff.Backoff`, so a server
that is restarting (``UNAVAILABLE``) is retried with jittered exponential waits; a session the
server no longer knows (``FAILED_PRECONDITION``, e.g. after a server restart) is re-joined; a
stage that closed before the client answered (``ABORTED``) makes the client a dropout of that
round, and it waits for the next one. Only a refused credential (``UNAUTHENTICATED``) or an
incompatible job (``FAILED_PRECONDITION`` at Join) ends the client with an error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

import fedveil
from fedveil.clients import participation
from fedveil.clients.admission import Admission
from fedveil.clients.backoff import Backoff, BackoffPolicy
from fedveil.clients.model_check import check_site_model, check_trainable
from fedveil.clients.participation import RoundLost
from fedveil.clients.policy import PolicyViolation, SitePolicy, check_job
from fedveil.clients.privacy import SitePrivacy
from fedveil.clients.secagg_driver import UnsupportedRoundError
from fedveil.clients.site_state import SiteState
from fedveil.clients.update import (
    AttemptRandomness,
    attempt_randomness,
    derive_seed,
    model_delta,
    seed_int,
)
from fedveil.dp.ledger import BudgetExceededError
from fedveil.errors import FedveilError
from fedveil.model_spec import ModelMismatchError, ModelSpec
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_vector
from fedveil.protocol.errors import (
    Incompatible,
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    ProtocolError,
    Replayed,
    StageClosed,
    Unauthenticated,
    Unavailable,
)
from fedveil.protocol.transport import ClientSession, Transport

log = logging.getLogger("fedveil.client")

EvaluateFn = Callable[[nn.Module], dict[str, float]]


class ClientError(FedveilError, RuntimeError):
    """The client cannot continue (refused credentials, incompatible job, bad local set-up)."""


class AuthenticationError(ClientError):
    """The server refused this client's credentials (``UNAUTHENTICATED``)."""


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended for this client."""

    round: int
    outcome: str  # "completed", "aborted", "dropped" or "declined" (sat out by the client's choice)
    reason: str = ""
    survivors: int = 0
    new_model_version: int = 0
    update_norm: float = 0.0
    clipped: bool = False


@dataclass
class ClientOptions:
    """Client-side settings.

    ``seed`` fixes the site's data order (shuffling, per round and attempt); left as None, a random
    one is drawn. Keys, masks, rounding and DP noise always come from the OS CSPRNG, fresh every
    attempt, unless ``insecure_deterministic`` (tests and bit-for-bit simulations only: the server
    could then predict them from a seed it knows).

    ``policy`` is the site's security policy (default: :class:`SitePolicy`'s malicious-server
    defaults, which need the consortium authority's key); ``credential`` the site's credential from
    that authority; ``state_path`` where the site keeps its attempts, releases and own privacy
    ledger across restarts (default: in memory).
    """

    seed: int | bytes | None = None
    num_examples: int = 0
    poll_wait_ms: int = 5_000
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    evaluate: EvaluateFn | None = None
    identity_key: Ed25519PrivateKey | None = None
    """Ed25519 identity key for active-adversary jobs (announced at Join, or enrolled)."""
    weight: float | None = None
    """This client's weight when the server aggregates a weighted mean; default: the number of
    examples the loop passes to :meth:`Round.submit` (capped at the server's ``max_weight``)."""
    policy: SitePolicy | None = None
    credential: bytes = b""
    state_path: Path | None = None
    insecure_deterministic: bool = False
    privacy_engine: Any = None
    """The site's own ``opacus.PrivacyEngine`` after its ``make_private[_with_epsilon]`` call: the site
    keeps its Opacus code, fedveil reads its ε from the engine's accountant."""

    def private_seed(self) -> bytes:
        if self.seed is None:
            return os.urandom(32)
        if isinstance(self.seed, bytes):
            if len(self.seed) < 16:
                raise ValueError(f"seed: at least 16 bytes (got {len(self.seed)})")
            return self.seed
        if self.seed < 0:
            raise ValueError(f"seed: must be non-negative (got {self.seed})")
        return self.seed.to_bytes(32, "little")


class Round:
    """One round for the user's training loop: the global model in, the trained model back.

    Attributes:
        number: the round (1-based); ``total_rounds`` how many the job has.
        model: the user's model with the global weights loaded.
        generator: a seeded ``torch.Generator`` for this client and round (pass it to a
            ``DataLoader(..., shuffle=True, generator=rnd.generator)`` for reproducible runs).
        learning_rate, batch_size, local_epochs: what the server suggests (0: the task's default).
    """

    def __init__(self, federation: Federation, start: pb.RoundStart, model: nn.Module, admission: Admission,
                 randomness: AttemptRandomness, graph_seed: bytes) -> None:
        self._federation = federation
        self._start = start
        self.admission = admission
        self._randomness = randomness
        self._graph_seed = graph_seed
        self.number = int(start.round)
        self.total_rounds = federation.total_rounds
        self.model = model
        self.global_vector = federation.spec.vector(model).copy()
        self.learning_rate = float(start.training.learning_rate)
        self.batch_size = int(start.training.batch_size)
        self.local_epochs = int(start.training.local_epochs)
        self.dp_mode = start.dp.mode or "none"
        self.seed = randomness.shuffle
        self.generator = torch.Generator().manual_seed(self.seed)
        self.outcome: RoundOutcome | None = None
        self._privatized: Any = None
        self._metrics: dict[str, float] | None = None
        self._eval_examples = 0.0
        self._loader_examples = 0
        """Records in the loader given to :meth:`privatize` (reported with the DP-SGD spend, so the server
        can check the sample rate against them)."""
        self._members: frozenset[int] = frozenset()

    def privatize(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> tuple[Any, Any, Any]:
        """Wrap ``(model, optimizer, loader)`` for local DP-SGD when the job uses local DP.

        Returns them unchanged in every other DP mode (and when the site passed its own
        ``privacy_engine``), so a loop can always call it. The model goes into train mode first (a
        ``test()`` run may have left it in eval mode). Everything that would make the round
        unsubmittable is checked before the first step, so no budget is spent on it: a layer DP-SGD
        cannot train raises :class:`fedveil.dp.compat.UnsupportedLayerError` naming the layer and
        the remedy, and a model that does not fit the job's model raises
        :class:`fedveil.model_spec.ModelMismatchError` naming the first differing parameter. The
        client's own accountant (one across all rounds) records the steps taken. With a target
        ε, a round the remaining budget cannot afford raises
        :class:`fedveil.dp.ledger.BudgetExceededError` here, before any training; the loop can
        then :meth:`decline` the round (as :func:`fedveil.clients.run_client` does).
        """
        model.train()
        self._loader_examples = _dataset_size(loader)
        if self.dp_mode != "local" or self._federation.options.privacy_engine is not None:
            self._federation.spec.check(model)
            self._privatized = (model, optimizer, loader) if self.dp_mode == "local" else None
            return model, optimizer, loader
        # A loop that rebinds its names (``model, optimizer, loader = rnd.privatize(...)``) hands
        # last round's wrapped objects back: privatize the originals again instead.
        originals = self._federation._dp_originals
        model = originals.get(id(model), model)
        optimizer = originals.get(id(optimizer), optimizer)
        loader = originals.get(id(loader), loader)
        model.train()
        check_trainable(model, self._federation.spec)
        wrapped = self._federation._local_dp().privatize(
            self._start.dp.local, model, optimizer, loader, local_epochs=self.local_epochs or 1
        )
        originals.clear()
        originals.update({id(w): o for w, o in zip(wrapped, (model, optimizer, loader), strict=True)})
        self._federation._dp_wrapped = wrapped  # keep them alive so their ids stay unique
        self._privatized = wrapped
        return wrapped

    def submit(self, model: nn.Module | None = None, *, num_examples: int | None = None) -> RoundOutcome:
        """Send the trained model's update (masked) and finish the round's secure aggregation.

        Blocks until the server announces how the round ended, and returns that outcome. Raw
        data and unmasked updates never leave the process.
        """
        if self.outcome is not None:
            raise ClientError(
                f"round {self.number}: already over for this client ({self.outcome.outcome}: "
                f"{self.outcome.reason or 'submit() was already called'})"
            )
        fed = self._federation
        if self.dp_mode == "local" and self._privatized is None and fed.options.privacy_engine is not None:
            # the site's own make_private[_with_epsilon] call wrapped its objects already: its engine's
            # accountant is the round's record of DP-SGD (privatize would return them unchanged)
            self._privatized = (model if model is not None else self.model, None, None)
        if self.dp_mode == "local" and self._privatized is None:
            # the job promises sample-level DP for every site: an update trained without it must not leave
            raise ClientError(
                f"round {self.number}: the job runs local DP (--dp local); call "
                "rnd.privatize(model, optimizer, loader) before training, then submit"
            )
        trained = model if model is not None else self.model
        if fed.options.privacy_engine is not None and self._privatized is not None:
            over = fed._local_dp().over_budget()
            if over:  # the steps were taken (and are accounted), but the update is not released
                fed._account_local_dp(self, trained)
                fed._sit_out(self, over, "declined")
                assert self.outcome is not None
                return self.outcome
        self.outcome = fed._finish_round(self, trained, num_examples)
        return self.outcome

    def decline(self, reason: str) -> RoundOutcome:
        """Sit this round out instead of submitting (e.g. the local privacy budget cannot afford it).

        The server is told at once (``RespondToRound`` with ``accept=false``) and drops the client
        from the round; the iterator moves on to the next instruction. The round is recorded in
        :attr:`Federation.history` as ``"declined"`` with ``reason``.
        """
        if self.outcome is not None:
            raise ClientError(f"round {self.number}: already over for this client ({self.outcome.outcome})")
        self._federation._sit_out(self, reason, "declined")
        assert self.outcome is not None
        return self.outcome

    @property
    def start_message(self) -> pb.RoundStart:
        return self._start


class Federation:
    """An iterator of :class:`Round` objects over one job; see :func:`fedveil.clients.federate`."""

    def __init__(
        self,
        transport: Transport,
        task_name: str,
        model: nn.Module,
        options: ClientOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.transport = transport
        self.task_name = task_name
        self.model = model
        self.options = options or ClientOptions()
        self.policy = self.options.policy if self.options.policy is not None else SitePolicy()
        self.state = SiteState.open(self.options.state_path)
        self.verified_credentials: set[bytes] = set()
        """Peer credentials whose authority signature this site already checked (once per job)."""
        self.private_seed = self.options.private_seed()
        self._sleep = sleep
        self._backoff_count = 0
        self._session: ClientSession | None = None  # header state (session id, run id, sequence) after Join
        self.client_name = ""
        self.total_rounds = 0
        self.job: pb.JobInfo | None = None
        self.job_done: pb.JobDone | None = None
        self.history: list[RoundOutcome] = []
        self.reconnects = 0
        self._pending: pb.PollResponse | None = None
        self._round_header: tuple[int, bytes] = (0, b"")
        self._local_dp_session: Any = None
        self._dp_originals: dict[int, Any] = {}
        self._dp_wrapped: Any = None
        self.spec = ModelSpec.of(model)
        """The job's model by name (from ``JobInfo.model`` at Join; the site's own model's until then)."""
        self._sitting_out: tuple[int, bytes] = (0, b"")
        """(round, nonce) of the round attempt this client dropped out of without submitting."""
        self._closed = False

    # -- public -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Round]:
        self._ensure_joined()
        while True:
            instruction = self._next_instruction()
            kind = instruction.WhichOneof("instruction")
            if kind == "round_start":
                start = instruction.round_start
                if self._sitting_out == (int(start.round), bytes(start.round_nonce)):
                    # the server keeps offering a round this client left until it records the decline
                    # (or the round's deadline): poll at a relaxed pace instead of at once
                    self._sleep(self._sit_out_interval())
                    continue
                rnd = self._begin_round(start)
                if rnd is None:
                    continue
                if start.purpose == pb.ROUND_PURPOSE_EVALUATE:
                    rnd.outcome = self._finish_round(rnd, None, None)
                    continue
                if self.options.privacy_engine is not None:
                    try:  # the site's own Opacus accountant against the job's local target, before training
                        self._local_dp().begin_round(start.dp.local)
                    except BudgetExceededError as err:
                        self._sit_out(rnd, f"local privacy budget exhausted: {err}", "declined")
                        continue
                yield rnd
                if rnd.outcome is None:
                    self._sit_out(rnd, "the loop did not call submit()")
            elif kind == "evaluate":
                self._evaluate_final(instruction.evaluate)
            elif kind == "job_done":
                done = self.job_done = instruction.job_done
                log.info("job %s done after %d rounds", done.run_id, done.completed_rounds)
                return
            elif kind == "round_result":
                self._round_header = (0, b"")  # a result for a round we were dropped from
            else:  # an instruction for a round this client has already left: ignore it
                log.debug("ignoring a stale %s instruction", kind)

    @property
    def run_id(self) -> str | None:
        return self._session.run_id if self._session is not None else None

    @property
    def privacy(self) -> SitePrivacy:
        """This site's privacy as it can vouch for it itself: sample-level (its DP-SGD accountant) and
        user-level (its own ledger of releases); ε = 0 before the first release, in every DP mode."""
        local = self._local_dp_session.spend() if self._local_dp_session is not None else None
        return SitePrivacy.of(self.state, local, self.policy.trust_server)

    def privacy_report(self) -> str:
        """The site's own privacy report (what ``fedveil budget report --site-state`` prints)."""
        return self.privacy.report()

    def _decline_attempt(self, start: pb.RoundStart, reason: str) -> None:
        """Tell the server at once that this site sits the attempt out (it becomes a dropout)."""
        saved = self._round_header
        self._round_header = (int(start.round), bytes(start.round_nonce))
        try:
            self._send("RespondToRound", lambda h: self.transport.respond_to_round(
                pb.RoundResponse(header=h, accept=False, decline_reason=reason[:256])))
        except RoundLost as err:
            log.info("round %d: the decline was not needed (%s)", start.round, err)
        finally:
            self._round_header = saved
        self._sitting_out = (int(start.round), bytes(start.round_nonce))

    def _sit_out(self, rnd: Round, reason: str, outcome: str = "dropped") -> None:
        """This client drops out of ``rnd`` (declined, or the loop did not submit it): the server is
        told at once, so the others need not wait for the round's deadline."""
        log.warning("round %d: sitting this round out (%s)", rnd.number, reason)
        self._decline_attempt(rnd.start_message, reason)
        self._round_header = (0, b"")
        rnd.outcome = RoundOutcome(rnd.number, outcome, f"sat out: {reason}")
        self.history.append(rnd.outcome)

    def _sit_out_interval(self) -> float:
        """Seconds between polls while the server still offers a round this client sat out."""
        return min(max(self.options.poll_wait_ms / 1000.0, 0.2), 2.0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_privacy(self) -> pb.LocalPrivacySpend | None:
        """The client's own sample-level privacy spend so far (local DP only)."""
        if self._local_dp_session is None:
            return None
        return self._local_dp_session.spend()

    # -- connection -------------------------------------------------------------------------

    def _with_backoff(self, what: str, call: Callable[[], Any]) -> Any:
        def on_retry(attempt: int, delay: float, err: BaseException) -> None:
            self._backoff_count += 1
            log.warning("%s: %s; retry %d in %.2f s", what, err, attempt, delay)

        backoff = Backoff(
            self.options.backoff, seed=seed_int(derive_seed(self.private_seed, "backoff", 0, 0)) + self._backoff_count,
            sleep=self._sleep, on_retry=on_retry,
        )
        return backoff.run(call, lambda e: isinstance(e, Unavailable))

    def _ensure_joined(self) -> None:
        if self._session is not None:
            return
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            task_name=self.task_name,
            client_version=fedveil.__version__,
            num_examples=max(int(self.options.num_examples), 0),
            identity_credential=self.options.credential,
            trust_server=self.policy.trust_server,
        )
        if self.options.identity_key is not None:
            request.identity_public_key = self.options.identity_key.public_key().public_bytes_raw()
        try:
            response: pb.JoinResponse = self._with_backoff("Join", lambda: self.transport.join(request))
        except Unauthenticated as err:
            raise AuthenticationError(f"the server refused this client's credentials: {err}") from None
        except Incompatible as err:
            raise ClientError(f"the server refused to let this client join: {err}") from None
        except ProtocolError as err:
            raise ClientError(f"cannot join the job: {err}") from None
        try:
            check_job(self.policy, response.job)
        except PolicyViolation as err:
            raise ClientError(f"this site's policy refuses the job: {err}") from None
        self.spec = check_site_model(response.job, self.model,
                                     own_privacy_engine=self.options.privacy_engine is not None)
        self._session = ClientSession.from_join(response)
        self.client_name = response.client_name
        self.job = response.job
        self.total_rounds = int(response.job.total_rounds)
        refusal = self.state.pin_job(self._session.run_id, self.total_rounds)
        if refusal is not None:
            self._session = None
            raise ClientError(f"this site refuses the job: {refusal}")
        log.info("joined run %s as %r (task %s, %d rounds); policy: %s", self._session.run_id, self.client_name,
                 response.job.task_name, self.total_rounds, self.policy.describe())

    def _rejoin(self, reason: str) -> None:
        log.warning("re-joining: %s", reason)
        self.reconnects += 1
        self._session = None
        self._round_header = (0, b"")
        self._ensure_joined()

    def _header(self) -> pb.RequestHeader:
        if self._session is None:
            raise ClientError("not joined: no session to send a request in")
        return self._session.header(*self._round_header)

    def _poll_once(self) -> pb.PollResponse:
        wait_ms = self.options.poll_wait_ms
        request = pb.PollRequest(header=self._header(), max_wait_ms=wait_ms)
        return self._with_backoff("Poll", lambda: self.transport.poll(request))

    def _next_instruction(self) -> pb.PollResponse:
        """Poll until the server has something other than Wait for this client."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        while True:
            self._ensure_joined()
            polled_at = time.monotonic()
            try:
                response = self._poll_once()
            except Unauthenticated as err:
                raise AuthenticationError(f"the server refused this client's credentials: {err}") from None
            except OutOfOrder as err:
                self._rejoin(str(err))
                continue
            except (PermissionDenied, StageClosed, Replayed):
                self._sleep(0.05)
                continue
            except ProtocolError as err:
                raise ClientError(f"polling failed: {err}") from None
            if response.WhichOneof("instruction") == "wait":
                # a long poll the server held until its limit: poll again at once (the next
                # instruction may come any moment); a Wait returned at once: honour retry_after
                held = time.monotonic() - polled_at >= 0.5
                if not held and response.wait.retry_after_ms > 0:
                    self._sleep(min(response.wait.retry_after_ms / 1000.0, 5.0))
                continue
            return response

    def _send(self, what: str, call: Callable[[pb.RequestHeader], pb.Ack]) -> None:
        """Send one stage message; ALREADY_EXISTS (a retried message that had arrived) is success."""
        try:
            self._with_backoff(what, lambda: call(self._header()))
        except Replayed:
            return  # a retried message that had already arrived
        except Unauthenticated as err:
            raise AuthenticationError(f"the server refused this client's credentials: {err}") from None
        except OutOfOrder as err:
            self._rejoin(str(err))
            raise RoundLost(f"{what}: {err}") from None
        except (StageClosed, PermissionDenied) as err:
            raise RoundLost(f"{what}: {err}") from None
        except ProtocolError as err:
            raise ClientError(f"{what} failed: {err}") from None

    # -- rounds -----------------------------------------------------------------------------

    def _begin_round(self, start: pb.RoundStart) -> Round | None:
        """Check the round against the policy, agree on the graph seed, load and evaluate the model."""
        try:
            vector = model_vector(start.model)  # checks the digest, the layout and finiteness
        except MalformedMessage as err:
            log.error("round %d: unusable global model from the server (%s); skipping the round", start.round, err)
            self._decline_attempt(start, f"unusable global model ({err})")
            return None
        try:
            admission = participation.admit(self, start)
        except PolicyViolation as err:
            log.warning("round %d (attempt %d): declined by this site's policy: %s", start.round, start.attempt, err)
            self._decline_attempt(start, f"policy: {err}")
            self.history.append(RoundOutcome(int(start.round), "declined", f"policy: {err}"))
            return None
        try:
            self.spec.load(vector, self.model)
        except ModelMismatchError as err:
            raise ClientError(f"round {start.round}: the server's model does not fit the job's model it "
                              f"announced at Join ({err})") from None
        self.model.train()  # the user's own test() may have left it in eval mode
        assert self.run_id is not None
        self.state.joined(self.run_id, int(start.round))
        attempt = self.state.record(self.run_id, int(start.round)).attempts
        randomness = attempt_randomness(self.private_seed, int(start.round), attempt,
                                        deterministic=self.options.insecure_deterministic)
        self._round_header = (int(start.round), bytes(start.round_nonce))
        try:
            graph_seed, members = participation.agree_graph_seed(self, start, randomness)
        except RoundLost as err:
            outcome = err.outcome if isinstance(err, participation.RoundEnded) else "dropped"
            log.warning("round %d: %s before training (%s)", start.round, outcome, err)
            if not isinstance(err, participation.RoundEnded) and self._pending is None:
                self._decline_attempt(start, str(err))  # the others need not wait for this site's deadline
            self._round_header = (0, b"")
            self.history.append(RoundOutcome(int(start.round), outcome, str(err)))
            return None
        rnd = Round(self, start, self.model, admission, randomness, graph_seed)
        rnd._members = members
        log.info("round %d/%d (attempt %d): %s (secagg id %d)", rnd.number, self.total_rounds, start.attempt,
                 "evaluating" if start.purpose == pb.ROUND_PURPOSE_EVALUATE else "training", start.client_id)
        wants_clear = start.training.evaluate_global_model and not start.encoding.evaluation.dimension \
            and self.policy.evaluation == "clear"
        evaluation_only = start.purpose == pb.ROUND_PURPOSE_EVALUATE
        if (admission.evaluate or wants_clear) and self.options.evaluate is not None \
                and self.state.evaluated(self.run_id, rnd.number, self.policy.max_evaluations_per_round) \
                and (not evaluation_only
                     or self.state.evaluated_for_job(self.run_id, self.policy.max_evaluations_per_job)):
            rnd._metrics = self._run_evaluate()  # of the global model, before local training
            rnd._eval_examples = float(rnd._metrics.get("examples", self.options.num_examples))
        return rnd

    def _report_metrics(
        self, model_version: int, metrics: dict[str, float], spend: pb.LocalPrivacySpend | None = None,
        num_examples: int = 0,
    ) -> None:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if len(finite) < len(metrics):
            # e.g. ROC AUC on local data with one class only: undefined, so not reported (the server
            # refuses non-finite values, and the client must not fail over a metric)
            log.info("not reporting undefined metric(s): %s", ", ".join(sorted(set(metrics) - set(finite))))
        report = pb.MetricsReport(
            model_version=model_version,
            num_examples=max(int(num_examples or self.options.num_examples), 0),
            metrics=[pb.Metric(name=k, value=v) for k, v in finite.items()],
        )
        if spend is not None:
            report.privacy.CopyFrom(spend)

        def call(header: pb.RequestHeader) -> pb.Ack:
            report.header.CopyFrom(header)
            return self.transport.report_metrics(report)

        try:
            self._send("ReportMetrics", call)
        except RoundLost as err:
            log.warning("metrics not accepted: %s", err)

    def _evaluate_final(self, evaluate: pb.Evaluate) -> None:
        """Per-site final evaluation in the clear: only when this site's policy opts in too. Otherwise
        answer with no metrics, so the server need not wait for this client until the deadline."""
        metrics: dict[str, float] = {}
        capped = self.run_id is not None and self.options.evaluate is not None \
            and self.policy.evaluation == "clear" \
            and not self.state.evaluated_for_job(self.run_id, self.policy.max_evaluations_per_job)
        if capped:
            log.info("final evaluation refused: this site answered max_evaluations_per_job=%d evaluation "
                     "request(s) of this job", self.policy.max_evaluations_per_job)
        elif self.options.evaluate is not None and self.policy.evaluation == "clear":
            try:
                self.spec.load(model_vector(evaluate.model), self.model)
                metrics = self._run_evaluate()
            except (MalformedMessage, ModelMismatchError) as err:
                log.error("final evaluation skipped: unusable model from the server (%s)", err)
        elif self.options.evaluate is not None:
            log.info("per-site evaluation in the clear refused by this site's policy (evaluation=%s)",
                     self.policy.evaluation)
        saved = self._round_header
        self._round_header = (int(evaluate.phase), bytes(evaluate.round_nonce))
        try:
            self._report_metrics(int(evaluate.round), metrics)
        finally:
            self._round_header = saved

    def _run_evaluate(self) -> dict[str, float]:
        """The user's evaluation function on the current model, leaving its train/eval mode as it was."""
        assert self.options.evaluate is not None
        training = self.model.training
        try:
            return self.options.evaluate(self.model)
        finally:
            self.model.train(training)

    def _local_dp(self) -> Any:
        if self._local_dp_session is None and self.options.privacy_engine is not None:
            from fedveil.clients.local_dp import EngineDpClient

            self._local_dp_session = EngineDpClient(self.options.privacy_engine)
        if self._local_dp_session is None:
            from fedveil.clients.local_dp import LocalDpClient

            seed = seed_int(derive_seed(self.private_seed, "dp-sgd", 0, 0)) \
                if self.options.insecure_deterministic else None
            self._local_dp_session = LocalDpClient(seed=seed)
        return self._local_dp_session

    def _account_local_dp(self, rnd: Round, trained: nn.Module) -> np.ndarray:
        """Close the round's DP-SGD: its event goes into the site's own ledger; the trained model's vector
        (by name, Opacus detached) comes back."""
        local = self.spec.vector(self._local_dp().finish_round(trained))
        event = self._local_dp().last_event
        if event is not None and self.run_id is not None:
            self.state.trained_with_local_dp(self.run_id, rnd.number, event)
        return local

    def _finish_round(self, rnd: Round, trained: nn.Module | None, num_examples: int | None) -> RoundOutcome:
        """Encode the trained model's update (``trained`` None: an evaluation-only round) and run the
        round's secure aggregation."""
        start = rnd.start_message
        if self._round_header != (rnd.number, bytes(start.round_nonce)):
            outcome = RoundOutcome(rnd.number, "dropped", "the client re-joined during the round")
            self.history.append(outcome)
            return outcome
        delta = None
        if trained is not None:
            spend = None
            if rnd._privatized is not None:
                local = self._account_local_dp(rnd, trained)
                spend = self.local_privacy
            else:
                local = self.spec.vector(trained)
            clear = rnd._metrics if (rnd._metrics is not None and not start.encoding.evaluation.dimension) else None
            if clear is not None or spend is not None:
                # this site's own DP-SGD spend (a claim the server labels as reported by the site), and
                # the global model's metrics in the clear only when both sides opted in to that
                self._report_metrics(int(start.model.version), clear or {}, spend,
                                     num_examples=num_examples or rnd._loader_examples)
                if self._round_header != (rnd.number, bytes(start.round_nonce)):
                    outcome = RoundOutcome(rnd.number, "dropped", "the client re-joined during the round")
                    self.history.append(outcome)
                    log.warning("round %d: dropped (the server lost this client's session)", rnd.number)
                    return outcome
            delta = model_delta(local, rnd.global_vector)
        # the weight this site declared when it accepted the round (the server checks the masked one against it)
        weight = participation.declared_weight(self, start)
        prepared = participation.encode_update(delta, start, rnd.admission, rnd._randomness, weight)
        try:
            section = participation.evaluation_section(start, rnd._metrics, rnd._eval_examples,
                                                       prepared.ring_vector.dtype if delta is not None
                                                       else _ring_dtype(start))
            ring = np.concatenate([prepared.ring_vector.astype(section.dtype, copy=False), section]) \
                if section.size else prepared.ring_vector
            done = participation.run_secagg(self, start, ring, rnd.admission, rnd._randomness, rnd._graph_seed,
                                            rnd._members)
            outcome = RoundOutcome(rnd.number, done[0], done[1], done[2], done[3], prepared.norm, prepared.clipped)
        except RoundLost as err:
            log.warning("round %d: dropped out (%s)", rnd.number, err)
            outcome = RoundOutcome(rnd.number, "dropped", str(err), update_norm=prepared.norm, clipped=prepared.clipped)
        except UnsupportedRoundError as err:
            log.warning("round %d: cannot take part (%s)", rnd.number, err)
            outcome = RoundOutcome(rnd.number, "dropped", str(err))
        self._round_header = (0, b"")
        self.history.append(outcome)
        log.info("round %d: %s%s", rnd.number, outcome.outcome, f" ({outcome.reason})" if outcome.reason else "")
        return outcome


def _ring_dtype(start: pb.RoundStart) -> np.dtype:
    return np.dtype(np.uint32 if int(start.encoding.ring_bits) <= 32 else np.uint64)


def _dataset_size(loader: Any) -> int:
    """Records in a data loader's dataset (0 when it cannot tell, e.g. an iterable dataset)."""
    try:
        return max(len(loader.dataset), 0)
    except (AttributeError, TypeError):
        return 0
