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

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch import nn

import fedveil
from fedveil.clients import participation, site_evaluation, site_reports
from fedveil.clients.admission import Admission, CohortRefused, ModelReplayRefused
from fedveil.clients.backoff import Backoff
from fedveil.clients.model_check import check_site_model
from fedveil.clients.options import AuthenticationError, ClientError, ClientOptions, RoundOutcome
from fedveil.clients.participation import RoundLost
from fedveil.clients.policy import PolicyViolation, SitePolicy, UserBudgetExceeded, check_job
from fedveil.clients.privacy import SitePrivacy
from fedveil.clients.round import Round
from fedveil.clients.site_state import SiteState
from fedveil.clients.update import (
    attempt_randomness,
    derive_seed,
    seed_int,
)
from fedveil.dp.ledger import BudgetExceededError
from fedveil.errors import FedveilError
from fedveil.model_spec import ModelMismatchError, ModelSpec
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_digest, model_vector
from fedveil.protocol.errors import (
    Incompatible,
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    ProtocolError,
    Replayed,
    StageClosed,
    TlsRefused,
    Unauthenticated,
    Unavailable,
)
from fedveil.protocol.identity_files import IdentityFileError
from fedveil.protocol.revocation_file import RevocationFile
from fedveil.protocol.transport import ClientSession, Transport
from fedveil.secagg.errors import IdentityError

log = logging.getLogger("fedveil.client")

MAX_RETRY_AFTER_S = 300.0
"""The longest this site waits when a server asks it to come back later (pace steering sends the
sites outside a running round away until it should end); a larger retry_after is cut to this."""


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
        self.state = SiteState.open(self.options.state_path, exclusive=True)
        shared = self.options.verified_credentials
        self.verified_credentials: set[bytes] = shared if shared is not None else set()
        self.verified_credentials.update(self.policy.roster_marks)
        """Peer credentials the authority vouched for that this site already checked: its signed
        roster's, and each other one once per job."""
        self.private_seed = self.options.private_seed()
        self._sleep = sleep
        self._backoff_count = 0
        self._session: ClientSession | None = None  # header state (session id, run id, sequence) after Join
        self._joined_run: str | None = None  # the one run this session takes part in (a re-join must keep it)
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
        self._revocation_file: RevocationFile | None = None
        self._round_evaluations: dict[tuple[str, int], tuple[bytes, dict[str, float]]] = {}
        """Per (run, round): the model this site evaluated (its digest) and the metrics, in memory only."""

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
                admitted = self._admit_start(start)
                # the round keeps its own copy of the start: the received one (with the cohort's n
                # credentials) is not held while the site waits through the round's stages
                del instruction, start
                rnd = self._begin_round(*admitted) if admitted is not None else None
                if rnd is None:
                    continue
                start = rnd.start_message
                if start.purpose == pb.ROUND_PURPOSE_EVALUATE:
                    rnd.outcome = self._finish_round(rnd, None, None)
                    continue
                if self.options.privacy_engine is not None:
                    try:  # the site's own Opacus accountant against the job's local target, before training
                        self._local_dp().begin_round(start.dp.local)
                    except BudgetExceededError as err:
                        self._sit_out(rnd, f"local privacy budget exhausted: {err}", "declined", out_of_budget=True)
                        continue
                try:
                    yield rnd
                finally:  # also when the loop breaks out or raises: the server hears at once
                    if rnd.outcome is None:
                        self._leave_unsubmitted(rnd)
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

    def _decline_attempt(self, start: pb.RoundStart, reason: str, refused_members: tuple[int, ...] = (),
                         out_of_budget: bool = False, cannot_evaluate: bool = False,
                         released_over_model: bool = False) -> None:
        """Tell the server at once that this site sits the attempt out (it becomes a dropout), and
        which other members' credentials or identity keys it refused, if that is why; ``out_of_budget``:
        its own privacy budget cannot afford the job's rounds (the server need not draw it again);
        ``released_over_model``: it declines every round over this model (a replay)."""
        saved = self._round_header
        self._round_header = (int(start.round), bytes(start.round_nonce))
        try:
            self._send("RespondToRound", lambda h: self.transport.respond_to_round(
                pb.RoundResponse(header=h, accept=False, decline_reason=reason[:256], refused_members=refused_members,
                                 out_of_budget=out_of_budget, cannot_evaluate=cannot_evaluate,
                                 released_over_model=released_over_model)))
        except RoundLost as err:
            log.info("round %d: the decline was not needed (%s)", start.round, err)
        finally:
            self._round_header = saved
        self._sitting_out = (int(start.round), bytes(start.round_nonce))

    def _sit_out(self, rnd: Round, reason: str, outcome: str = "dropped", *, out_of_budget: bool = False,
                 cannot_evaluate: bool = False) -> None:
        """This client drops out of ``rnd`` (declined, or the loop did not submit it): the server is
        told at once, so the others need not wait for the round's deadline."""
        log.warning("round %d: sitting this round out (%s)", rnd.number, reason)
        self._decline_attempt(rnd.start_message, reason, out_of_budget=out_of_budget, cannot_evaluate=cannot_evaluate)
        self._round_header = (0, b"")
        rnd.outcome = RoundOutcome(rnd.number, outcome, f"sat out: {reason}")
        self.history.append(rnd.outcome)

    def _leave_unsubmitted(self, rnd: Round) -> None:
        try:
            self._sit_out(rnd, "the loop did not call submit()")
        except FedveilError as err:  # leaving anyway; the server's deadline still covers the round
            log.warning("round %d: could not tell the server this site left it: %s", rnd.number, err)

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

    def _with_backoff(self, what: str, call: Callable[[], Any], *, first_join: bool = False) -> Any:
        def on_retry(attempt: int, delay: float, err: BaseException) -> None:
            self._backoff_count += 1
            log.warning("%s: %s; retry %d in %.2f s", what, err, attempt, delay)

        backoff = Backoff(
            self.options.backoff, seed=seed_int(derive_seed(self.private_seed, "backoff", 0, 0)) + self._backoff_count,
            sleep=self._sleep, on_retry=on_retry,
        )
        # a TLS set-up no retry is likely to mend fails the first Join at once (TlsRefused); later, retried
        return backoff.run(call, lambda e: isinstance(e, Unavailable)
                           and not (first_join and isinstance(e, TlsRefused)))

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
            # a hint for an honest server; a round asking for sums this site would not fill is declined
            evaluates=self.options.evaluate is not None and self.policy.evaluation == "secure",
            evaluates_under_local_dp=self.policy.evaluate_under_local_dp,
        )
        if self.options.identity_key is not None:
            request.identity_public_key = self.options.identity_key.public_key().public_bytes_raw()
        try:
            response: pb.JoinResponse = self._with_backoff("Join", lambda: self.transport.join(request),
                                                           first_join=self._joined_run is None)
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
        if self._joined_run not in (None, self._session.run_id):
            # a new run would start fresh per-run caps (evaluations, attempts): the operator starts that
            refusal: str | None = (f"the server moved this site from run {self._joined_run} to run "
                                   f"{self._session.run_id} on re-join; a client session takes part in one run "
                                   "(start the client again for a new one)")
        else:
            refusal = self.state.pin_job(self._session.run_id, self.total_rounds)
        if refusal is not None:
            self._session = None
            raise ClientError(f"this site refuses the job: {refusal}")
        self._joined_run = self._session.run_id
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
        # a header per attempt: a poll cut on its way back had reached the server, which would refuse
        # the same header again as a replay
        return self._with_backoff(
            "Poll", lambda: self.transport.poll(pb.PollRequest(header=self._header(), max_wait_ms=wait_ms)))

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
                # instruction may come any moment); a Wait that came sooner (a busy server sending
                # this site away, however slowly its answer arrived over a loaded network): honour
                # retry_after. A server whose own poll wait is shorter costs a short pause, no more.
                held = time.monotonic() - polled_at >= 0.9 * self.options.poll_wait_ms / 1000.0
                if not held and response.wait.retry_after_ms > 0:
                    self._sleep(min(response.wait.retry_after_ms / 1000.0, MAX_RETRY_AFTER_S))
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

    def _admit_start(self, start: pb.RoundStart) -> tuple[pb.RoundStart, Admission, np.ndarray] | None:
        """Check the round's model and the round against the policy; returns the start as the site
        keeps it (:func:`participation.kept_start`), the admission and the global model's vector."""
        self._refresh_revocations()
        try:
            vector = model_vector(start.model)  # checks the digest, the layout and finiteness
        except MalformedMessage as err:
            log.error("round %d: unusable global model from the server (%s); skipping the round", start.round, err)
            self._decline_attempt(start, f"unusable global model ({err})")
            return None
        try:
            admission = participation.admit(self, start, model_digest(vector))
            site_evaluation.check_evaluation_left(self, start, admission)
        except PolicyViolation as err:
            log.warning("round %d (attempt %d): declined by this site's policy: %s", start.round, start.attempt, err)
            self._decline_attempt(start, f"policy: {err}", err.members if isinstance(err, CohortRefused) else (),
                                  out_of_budget=isinstance(err, UserBudgetExceeded),
                                  released_over_model=isinstance(err, ModelReplayRefused))
            self.history.append(RoundOutcome(int(start.round), "declined", f"policy: {err}"))
            return None
        return participation.kept_start(start), admission, vector

    def _begin_round(self, start: pb.RoundStart, admission: Admission, vector: np.ndarray) -> Round | None:
        """Agree on the graph seed, load and evaluate the model of an admitted round."""
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
        problem = site_evaluation.evaluate_for_round(self, rnd, start, admission)
        if problem is not None:
            self._sit_out(rnd, problem, "declined", cannot_evaluate=True)
            return None
        return rnd

    def _refresh_revocations(self) -> None:
        """The revocation list in ``--revocations`` now (one ``stat`` while unchanged): a list the operator
        replaced mid-job counts from the next round, as on the server (review of 2026-12-07)."""
        path, policy = self.options.revocations_path, self.policy
        if path is None or policy.authority_public_key is None or policy.consortium is None:
            return
        if self._revocation_file is None:
            try:
                self._revocation_file = RevocationFile(path, policy.authority_public_key, policy.consortium, log=log)
            except (IdentityFileError, IdentityError) as err:
                log.error("--revocations %s: cannot be read again (%s); keeping the list this site started with",
                          path, err)
                return
        current = self._revocation_file.refresh()
        if policy.revocations is None or current.version > policy.revocations.version:
            self.policy = dataclasses.replace(policy, revocations=current)

    def _report_metrics(self, model_version: int, metrics: dict[str, float],
                        spend: pb.LocalPrivacySpend | None = None, num_examples: int = 0) -> None:
        site_reports.report_metrics(self, model_version, metrics, spend, num_examples)

    def _evaluate_final(self, evaluate: pb.Evaluate) -> None:
        site_reports.evaluate_final(self, evaluate)

    def _local_dp(self) -> Any:
        if self._local_dp_session is None and self.options.privacy_engine is not None:
            from fedveil.clients.local_dp import EngineDpClient

            state = self.state
            self._local_dp_session = EngineDpClient(
                self.options.privacy_engine, lifetime=state.lifetime_local_epsilon, lifetime_delta=state.delta,
                model=self.model)
        if self._local_dp_session is None:
            from fedveil.clients.local_dp import LocalDpClient

            seed = seed_int(derive_seed(self.private_seed, "dp-sgd", 0, 0)) \
                if self.options.insecure_deterministic else None
            # a client restarted mid-job resumes its accountant with the steps its saved state holds for the run
            self._local_dp_session = LocalDpClient(
                seed=seed, earlier=lambda: self.state.local_dp_events(self.run_id) if self.run_id is not None else [],
                lifetime=self.state.lifetime_local_epsilon, lifetime_delta=self.state.delta)
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
        round's secure aggregation (:func:`fedveil.clients.participation.finish_round`)."""
        return participation.finish_round(self, rnd, trained, num_examples)
