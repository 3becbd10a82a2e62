"""Sites: join, credentials, sessions and replay checks, long polls, availability."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from fedveil.protocol import PROTOCOL_VERSION, SESSION_ID_BYTES
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import (
    Incompatible,
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    Replayed,
    Unavailable,
)
from fedveil.protocol.revocation_file import RevocationFile
from fedveil.secagg import errors as sa_errors
from fedveil.secagg.identity import SiteCredential, verify_credential
from fedveil.server.config import ServerConfigError
from fedveil.server.coordinator.state import (
    MAX_CREDENTIAL_BYTES,
    MAX_STEER_S,
    PUBLIC_KEY_BYTES,
    STEERED_RETURNS_PER_S,
    WAIT_RETRY_MS,
    CoordinatorBase,
    Stage,
    _Client,
    _credential_serial,
    _Round,
    log,
)


def _uniform() -> float:
    """A uniform draw in [0, 1) from the OS (spreads the sites' returns; nothing secret)."""
    return secrets.randbelow(1 << 20) / float(1 << 20)


class SessionsMixin(CoordinatorBase):
    """Sites: join, credentials, sessions and replay checks, long polls, availability."""

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
        if client.refused:  # closed at a cohort draw: it hears why once it has its last round's result
            if client.pending_result is None:
                raise OutOfOrder(f"{rpc}: the server closed this session: {client.refused}")
        else:
            client.disconnected = False
        if not consume:
            return client
        if header.sequence <= client.last_sequence:
            raise Replayed(
                f"{rpc}: replayed message (sequence {header.sequence}, last seen {client.last_sequence})"
            )
        client.last_sequence = header.sequence
        return client

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
        if self.config.secagg.active_adversary and not (request.identity_public_key or enrolled_key):
            raise Incompatible(
                "identity_public_key: this job runs in active-adversary mode; the client needs an Ed25519 "
                "identity key (enrolled with fedveil enroll --identity-public-key, or sent at Join)"
            )
        credential, vouched = self._check_credential(caller, request, enrolled_key)
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            old = self._clients.get(caller)
            client = _Client(name=caller, session_id=os.urandom(SESSION_ID_BYTES),
                             num_examples=int(request.num_examples),
                             identity_key=bytes(request.identity_public_key) or (enrolled_key or b""),
                             credential=credential, trust_server=bool(request.trust_server), vouched=vouched,
                             evaluates=bool(request.evaluates),
                             evaluates_under_local_dp=bool(request.evaluates_under_local_dp))
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
            self._clients[caller] = client
            if old is not None:
                # its old session's held poll ends now. A first Join wakes no one: every held poll
                # re-checking its instruction at each of 10,000 Joins was a thundering herd that kept
                # the server from serving the Joins; the job's own waits re-check within 0.5 s anyway
                self._cond.notify_all()
            log.info("client %s joined (session %s…; %s)", caller, client.session_id.hex()[:8],
                     "trusting the server (passive)" if request.trust_server else
                     ("malicious-server checks, credential " + _credential_serial(credential)
                      if credential else "malicious-server checks"))
            return pb.JoinResponse(
                session_id=client.session_id, run_id=self.run_id, client_name=caller, job=self.job_info,
                poll_interval_ms=WAIT_RETRY_MS, max_message_bytes=self.max_message_bytes(),
            )

    def _check_credential(self, caller: str, request: pb.JoinRequest,
                          enrolled_key: bytes | None) -> tuple[bytes, SiteCredential | None]:
        """The site's authority credential (its bytes, and the credential as verified; None without an
        authority): it must name the caller and its identity key. The sites check it against the
        authority they pinned; the server checks it too against the authority it was given
        (``--authority``, required in active mode), so a bad credential is refused at Join rather than
        in every round, and again at every cohort draw (:meth:`_recheck_credentials`)."""
        raw = bytes(request.identity_credential)
        if not raw:
            if self.config.secagg.active_adversary:
                raise Incompatible("identity_credential: this job runs with malicious-server protections; the site "
                                   "needs its credential from the consortium authority (fedveil authority issue)")
            return b"", None
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
        authority = self.config.secagg.authority_key_bytes
        if authority is None:
            return raw, None
        try:  # against the list the last cohort draw read from --revocations
            verify_credential(authority, credential, consortium=self.config.secagg.consortium,
                              now=int(self._wall_clock()), revocations=self.revocations)
        except sa_errors.SecAggError as err:
            raise PermissionDenied(f"identity_credential: {err}") from None
        return raw, credential

    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse:
        wait_s = min(request.max_wait_ms / 1000.0, self.config.schedule.poll_wait)
        with self._cond:
            if self._stopping and self._done is None:
                raise Unavailable("the server is shutting down; retry later")
            client = self._session(caller, request.header, "Poll")
            if self._stopping:  # the job is over: a site that missed the linger hears it while serving lasts
                done = self._instruction_for(client)
                assert done is not None  # a pending round result, then JobDone
                return done
            token = object()
            client.poll_token = token
            client.back_by = float("-inf")  # back (early or late): it is polling now
            client.polling += 1
            try:
                deadline = self._clock() + wait_s
                while True:
                    client.last_polled = self._clock()
                    instruction = self._instruction_for(client)
                    if instruction is not None:
                        return instruction
                    if client.poll_token is not token or self._clients.get(caller) is not client:
                        return pb.PollResponse(wait=pb.Wait(retry_after_ms=0, reason="superseded by a newer poll"))
                    remaining = deadline - self._clock()
                    if remaining <= 0 or self._stopping:
                        reason = self._wait_reason(client)
                        return pb.PollResponse(wait=pb.Wait(retry_after_ms=WAIT_RETRY_MS, reason=reason))
                    busy = self._busy_wait(client)
                    if busy is not None:
                        return busy
                    self._waiting_polls += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiting_polls -= 1
            finally:
                client.polling -= 1
                if not client.disconnected:
                    client.last_polled = self._clock()

    def _busy_wait(self, client: _Client) -> pb.PollResponse | None:
        """A Wait instead of a held poll when the held polls are at their limit (lock held).

        Long polls hold server threads, so their number is bounded. Half the budget is kept for the
        members of the running round or evaluation, who need their next instruction at once. The
        others (the idle majority of a large federation) are sent away with a time to come back:
        pace steering, as in Bonawitz et al., "Towards Federated Learning at Scale: System Design"
        (SysML 2019), section 2.3. Between rounds that is a quarter of a poll wait plus a random
        spread (:meth:`_steer_spread_s`); a site due back within 1.25 poll waits counts for the next
        cohort (:meth:`_available`). While a round runs, nothing new can start before it ends, so
        they come back as it is expected to end (:meth:`_round_remaining_s`), spread the same way:
        re-polling a busy server every few seconds is what stalled a round with 1,000 sites idle
        next to it. The job's end waits for the sites still away (:meth:`_announce_done`).
        """
        if self.max_waiting_polls is None:
            return None
        round_member = (self._round is not None and client.name in self._round.cohort) or (
            self._evaluation is not None and client.name in self._evaluation.participants)
        limit = self.max_waiting_polls if round_member else self.max_waiting_polls // 2
        if self._waiting_polls < limit:
            return None
        if round_member:
            return pb.PollResponse(wait=pb.Wait(retry_after_ms=WAIT_RETRY_MS, reason="server busy: poll again shortly"))
        schedule = self.config.schedule
        delay_s = schedule.poll_wait * 0.25 + self._steer_spread_s() * _uniform()
        remaining_s = self._round_remaining_s()
        if remaining_s > 0:
            delay_s = min(delay_s + remaining_s, MAX_STEER_S)
            reason = f"round {self._round.number if self._round else 0} is running without you: come back as it ends"
        else:
            reason = "server busy: poll again later"
        delay_s = max(delay_s, 2 * WAIT_RETRY_MS / 1000.0)
        client.back_by = self._clock() + delay_s
        return pb.PollResponse(wait=pb.Wait(retry_after_ms=int(1000 * delay_s), reason=reason))

    def _steer_spread_s(self) -> float:
        """Over how long the sites sent away come back: a poll wait, or longer with so many sites
        that they would return faster than :data:`STEERED_RETURNS_PER_S` (10,000 sites re-polling
        within seconds kept calls queued in gRPC past its 30 s limit, which then cancelled them)."""
        return max(self.config.schedule.poll_wait, len(self._clients) / STEERED_RETURNS_PER_S)

    def _round_remaining_s(self) -> float:
        """How long the running training round should still take (lock held): the last completed
        round's length less this one's age; before any round completed, as long again as it has run."""
        rnd = self._round
        if rnd is None or rnd.purpose != pb.ROUND_PURPOSE_TRAIN:
            return 0.0
        age = self._clock() - rnd.started
        expected = self._last_round_s if self._last_round_s is not None else 2 * age
        return max(expected - age, 0.0)

    def client_disconnected(self, caller: str, session_id: bytes) -> None:
        """The transport saw ``caller``'s held poll cancelled (its process or connection is gone):
        it no longer counts as connected for cohorts, and its held poll is released at once.
        A round it is in still waits for its deadline (it may reconnect in time)."""
        with self._cond:
            client = self._clients.get(caller)
            if client is None or not hmac.compare_digest(client.session_id, session_id):
                return
            client.disconnected = True
            client.last_polled = float("-inf")
            client.poll_token = None
            self._cond.notify_all()
        log.info("client %s disconnected", caller)

    def site_gone(self, name: str, reason: str) -> None:
        """The host that ran site ``name`` saw its session end for good (its client code gave up or
        failed, or its process died): it is not drawn again, and if it is a member of the running
        round that still owes the current stage, it is out of the round now rather than at the
        stage's deadline. A simulation's driver knows this; a deployment learns it at the deadline.
        (A site that gave up during the rush of 10,000 first polls was drawn for the first cohort,
        and the round waited out an hour's stage deadline for it.)"""
        with self._cond:
            client = self._clients.get(name)
            if client is not None:
                client.disconnected = True
                client.poll_token = None
            rnd = self._round
            if rnd is not None and name in rnd.cohort:
                rnd.gone[name] = reason[:200]
                self._drop_gone(rnd)
            self._cond.notify_all()

    def _drop_gone(self, rnd: _Round) -> None:
        """Members whose session ended leave the round at the first stage they still owe (lock
        held): as a member missing that stage's deadline does, without the wait."""
        for name, reason in sorted(rnd.gone.items()):
            if name in rnd.dropped or rnd.stage in rnd.submitted.get(name, set()):
                continue
            if rnd.stage == Stage.COMMIT and not rnd.closing:  # a closing beacon is the round driver's
                rnd.beacon.decline(rnd.cohort[name])
            rnd.dropped[name] = (rnd.stage.label, f"its session ended: {reason}")
            log.warning("round %d (attempt %d): %s is out at %s: its session ended (%s)", rnd.number, rnd.attempt,
                        name, rnd.stage.label, reason)

    def _identity_key(self, name: str) -> bytes:
        client = self._clients.get(name)
        if client is not None and client.identity_key:
            return client.identity_key
        return self.store.identity_key(name) or b""

    def _credential(self, name: str) -> bytes:
        client = self._clients.get(name)
        return client.credential if client is not None else b""

    # ------------------------------------------------------------------------------------------
    # The driver
    # ------------------------------------------------------------------------------------------
    def _present(self, c: _Client, now: float, due_within: float) -> bool:
        """Whether ``c`` is with the server (lock held): not disconnected, and polling, back from its
        last poll within the poll window, or sent away by pace steering and due back within
        ``due_within``. Its other calls do not count: a site that joined and only sends reports (or a
        loop that joined and has not asked for a round yet) was drawn, and its round waited out the
        commit stage's deadline for it."""
        if c.disconnected or c.refused:
            return False
        if c.polling > 0:
            return True
        if c.back_by > now:  # sent away and not due yet
            return c.back_by - now <= due_within
        return now - max(c.last_polled, c.back_by) <= self.config.schedule.poll_wait + 5.0

    def _available(self) -> list[str]:
        """Sites a cohort may be drawn from: present, and if sent away by pace steering, due back
        within 1.25 poll waits (the longest it is sent away between rounds in a federation of up
        to ``poll_wait`` x :data:`STEERED_RETURNS_PER_S` sites)."""
        now = self._clock()
        due_within = 1.25 * self.config.schedule.poll_wait
        return sorted(c.name for c in self._clients.values() if self._present(c, now, due_within))

    # ------------------------------------------------------------------------------------------
    # Credentials after Join
    # ------------------------------------------------------------------------------------------
    def watch_revocations(self, path: Path | str) -> None:
        """Take the revocation list from ``path`` (``--revocations``) and read it again whenever the
        file changes, so an operator can revoke a site mid-job (:class:`RevocationFile`). Raises if
        the job has no authority or the file does not verify under it."""
        authority = self.config.secagg.authority_key_bytes
        if authority is None:
            raise ServerConfigError("--revocations", "needs --authority (the list is checked against the "
                                    "authority's key)")
        watched = RevocationFile(path, authority, self.config.secagg.consortium)
        with self._cond:
            self.revocation_file = watched
            self.revocations = watched.current

    def _recheck_credentials(self) -> None:
        """Every joined site's credential again (lock held; before each cohort is drawn): against the
        time now and the revocation list held now (``--revocations`` read again if it changed).

        The signature was verified at Join; what can change since is the clock and the list. A site
        whose credential has expired or been revoked is not drawn again and its session is closed:
        its next call is refused with the reason (after its last round's result), and a Join with the
        same credential is refused at Join. Members of the running round are left to it (its roster
        was checked by every member when it started) and checked at the next draw. Without this, a
        site revoked mid-job was drawn into every cohort, each roster refused by every honest site,
        until the round's attempts ran out (the attacker review of the sites)."""
        if self.revocation_file is not None:
            self.revocations = self.revocation_file.refresh()
        revocations = self.revocations
        now = int(self._wall_clock())
        rnd = self._round
        for client in self._clients.values():
            credential = client.vouched
            if credential is None or client.refused or (rnd is not None and client.name in rnd.cohort):
                continue
            if now >= credential.not_after:
                why = f"identity_credential: expired at {credential.not_after} (unix time), now is {now}"
            elif revocations is not None and credential.serial in revocations.revoked:
                why = (f"identity_credential: serial {credential.serial_hex} is revoked (revocation list version "
                       f"{revocations.version})")
            else:
                continue
            client.refused = why
            client.disconnected = True
            client.poll_token = None  # its held poll ends now
            self._cond.notify_all()
            log.warning("client %s is not drawn again and its session is closed: %s", client.name, why)

    def _drawable(self) -> list[str]:
        """The sites a cohort is drawn from (lock held): :meth:`_available`, once every joined site's
        credential has been checked again (:meth:`_recheck_credentials`). Only the draws check: a
        poll's wait reason only counts the available sites."""
        self._recheck_credentials()
        return self._available()

    def _connected(self) -> list[_Client]:
        """Sites present, however long pace steering sent them away for (lock held)."""
        now = self._clock()
        return [c for c in self._clients.values() if self._present(c, now, float("inf"))]

    def _due_back(self) -> list[_Client]:
        """Sites sent away by pace steering that have not come back yet (lock held)."""
        now = self._clock()
        return [c for c in self._clients.values() if not c.disconnected and c.polling == 0 and c.back_by > now]

    def _available_count(self) -> int:
        return len(self._available())

    def connected_sites(self) -> int:
        """Sites connected now (polling, seen within the poll window, or sent away by pace steering
        and not overdue): for the metrics."""
        with self._cond:
            return len(self._connected())

    def joined_sites(self) -> int:
        """Sites with a session that has not been closed, whether or not they are with the server now
        (a site sent away by pace steering that is late back still counts)."""
        with self._cond:
            return sum(not c.disconnected for c in self._clients.values())

    # ------------------------------------------------------------------------------------------
    # Instructions
    # ------------------------------------------------------------------------------------------
    def _wait_reason(self, client: _Client) -> str:
        rnd = self._round
        if rnd is not None:
            if client.name in rnd.cohort:
                return f"round {rnd.number}: waiting for other clients at stage {rnd.stage.label}"
            return f"round {rnd.number} is running without you"
        return f"waiting for a cohort ({self._available_count()} of {self.config.schedule.clients_per_round} connected)"

    def stop(self) -> None:
        """Ask :meth:`run` to stop at the next opportunity (the store stays consistent)."""
        self._stop_event.set()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
