"""The server half of the secure-aggregation driver: protobuf to secagg messages and back,
stage by stage (the twin of :mod:`fedveil.clients.secagg_driver`), uploads and model fetches.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from fedveil.protocol import ROUND_NONCE_BYTES
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import decode_ring_vector
from fedveil.protocol.errors import (
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    ProtocolError,
    Replayed,
    StageClosed,
)
from fedveil.protocol.model_delivery import PublishedModel
from fedveil.protocol.uploads import UploadReservation
from fedveil.secagg import errors as sa_errors
from fedveil.secagg import messages as sa
from fedveil.secagg.beacon import BeaconError
from fedveil.secagg.keys import POSSESSION_PROOF_BYTES
from fedveil.secagg.server import SecAggServer
from fedveil.server.coordinator.attempt_endings import RELEASED_UNCHANGED
from fedveil.server.coordinator.refusal_tally import refused_slots
from fedveil.server.coordinator.state import (
    MAX_SHARE_BOX_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    CoordinatorBase,
    Stage,
    _Client,
    _Round,
    log,
)
from fedveil.server.uploads import UploadBook

MessageT = TypeVar("MessageT", bound=sa.Message)


class SecAggBridgeMixin(CoordinatorBase):
    """Protobuf to secagg messages and back, stage by stage; uploads and model fetches."""

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

    def _sender(self, caller: str, header: pb.RequestHeader, stage: Stage, rpc: str,
                problem: str | None) -> tuple[_Client, _Round, int]:
        """The caller's session, round and secagg id for a message of ``stage`` (lock held), as
        :meth:`_session` and :meth:`_round_for` find them. A message already found malformed while it
        was parsed (``problem``) from a caller that is not a member of the stage gets that field's
        error rather than its header's; a member's is refused by the caller (:meth:`_refuse_message`)."""
        try:
            client = self._session(caller, header, rpc)
            rnd, sid = self._round_for(client, header, stage, rpc)
        except ProtocolError:
            if problem is not None:
                raise MalformedMessage(problem) from None
            raise
        return client, rnd, sid

    def _feed(self, rnd: _Round, sid: int, message: sa.Message, stage: Stage, name: str) -> pb.Ack:
        assert rnd.secagg is not None
        try:
            rnd.secagg.receive(sid, message)
        except (sa_errors.WrongRoundError, sa_errors.UnexpectedMessageError) as err:
            raise OutOfOrder(f"{stage.label}: {err}") from None
        except (sa_errors.SecAggError, ValueError) as err:  # malformed, a bad signature, a proven lie
            why = rnd.secagg.misconduct.get(sid) if stage == Stage.UNMASKING else None
            raise self._refuse_message(rnd, name, stage, f"{stage.label}: {err}",
                                       reason=None if why is None else f"it {why}") from None
        rnd.submitted.setdefault(name, set()).add(stage)
        self._notify_if_stage_complete(rnd)
        return pb.Ack(round=rnd.number, stage=stage.wire, detail="accepted")  # type: ignore[arg-type]

    def _refuse_message(self, rnd: _Round, name: str, stage: Stage, problem: str,
                        reason: str | None = None) -> MalformedMessage:
        """A cohort member's message for the open stage refused (lock held; its session and round were
        checked, so only the member itself can cause this): it is a dropout of the stage at once, as a
        member that declines or falls silent is. To the protocol it is the same, since the message
        never entered the round. Before, the stage waited out its deadline for it, though an honest
        client stops on INVALID_ARGUMENT: one site sending share boxes to the wrong holders, a masked
        input of the wrong size or an unmasking answer that does not parse cost every round it was
        drawn for a stage timeout. A holder whose answer was proven false (a share its owner never
        committed to) is also convicted when the round ends (:meth:`_convict_unmasking_misconduct`).
        Returns the error the member gets (``problem``); ``reason`` is the dropout's record."""
        rnd.dropped.setdefault(name, (stage.label, reason or f"its message was refused: {problem}"))
        log.info("round %d (attempt %d): %s is out of the round at %s: its message was refused (%s)", rnd.number,
                 rnd.attempt, name, stage.label, problem)
        self._cond.notify_all()
        return MalformedMessage(problem)

    def _notify_if_stage_complete(self, rnd: _Round) -> None:
        """Wake the waiters (lock held) once the stage has every answer it waits for.

        One more answer changes nothing for anyone else: the round driver waits for the last one and
        every held poll for the next stage. Waking all of them at every answer cost the server n
        wake-ups per message, n² per stage, each taking the interpreter lock."""
        if not rnd.live_pending():
            self._cond.notify_all()

    def respond_to_round(self, caller: str, request: pb.RoundResponse) -> pb.Ack:
        """A cohort member accepts the round with its graph-seed commitment, or declines it.

        A decline is honoured until the member's masked input is in (any stage up to MASKED_INPUT): it
        becomes a dropout at once, so nobody waits for its deadline. After its keys are in this is the
        ordinary dropout of Bonawitz et al. (its pairwise masks are removed from the sum at unmasking);
        a site saying so tells the server nothing that its silence would not. Its reason is logged, cut
        to one printable line.
        """
        bad = None if len(request.commitment) == 32 else f"commitment: expected 32 bytes, got {len(request.commitment)}"
        with self._cond:
            if request.accept:
                _client, rnd, sid = self._sender(caller, request.header, Stage.COMMIT, "RespondToRound", bad)
                if bad is not None:
                    raise self._refuse_at_commit(rnd, caller, sid, bad)
                if not math.isfinite(request.weight):
                    raise self._refuse_at_commit(rnd, caller, sid, f"weight: {request.weight!r} is not a finite "
                                                                    "number")
                if rnd.plan.encoding.weighted:
                    top = float(rnd.plan.encoding.max_weight)
                    if not 1.0 <= request.weight <= top:
                        raise self._refuse_at_commit(rnd, caller, sid, f"weight: must be in [1, {top:g}] "
                                                                        f"(got {request.weight:g})")
                    rnd.weights[sid] = float(request.weight)
                try:
                    rnd.beacon.receive_commitment(sid, bytes(request.commitment))
                except BeaconError as err:
                    raise self._refuse_at_commit(rnd, caller, sid, f"commitment: {err}") from None
                rnd.submitted.setdefault(caller, set()).add(Stage.COMMIT)
                self._notify_if_stage_complete(rnd)
                return pb.Ack(round=rnd.number, stage="STAGE_COMMIT", detail="accepted")
            self._session(caller, request.header, "RespondToRound")
            current = self._round
            if current is None or request.header.round != current.number or not hmac.compare_digest(
                    request.header.round_nonce, current.nonce) or caller not in current.cohort:
                raise StageClosed("RespondToRound: no running round of yours to decline")
            rnd = current
            if caller in rnd.dropped:
                raise Replayed(f"RespondToRound: already out of round {rnd.number}")
            if rnd.stage > Stage.MASKED_INPUT or Stage.MASKED_INPUT in rnd.submitted.get(caller, set()) \
                    or self._upload_book().active(caller, rnd.nonce, Stage.MASKED_INPUT):
                raise StageClosed(f"RespondToRound: too late to leave round {rnd.number} (its masked input is in)")
            why = "".join(ch if ch.isprintable() else " " for ch in request.decline_reason[:256]).strip() or "-"
            sid = rnd.cohort[caller]
            if rnd.stage == Stage.COMMIT and request.refused_members:  # members it refused (refusal_tally.py)
                try:
                    rnd.refusals[sid] = refused_slots(request.refused_members, len(rnd.names), sid)
                except MalformedMessage as err:
                    raise self._refuse_at_commit(rnd, caller, sid, str(err), "decline") from None
            if rnd.stage == Stage.COMMIT and Stage.COMMIT not in rnd.submitted.get(caller, set()) and not rnd.closing:
                rnd.beacon.decline(sid)  # (the driver closes the beacon outside the lock once the stage is closing)
            rnd.dropped[caller] = (rnd.stage.label, f"declined: {why}")
            if request.cannot_evaluate and caller not in self._cannot_evaluate:
                # e.g. ROC AUC on its one-class records: cohorts with it get no evaluation sums from now on
                self._cannot_evaluate.add(caller)
                log.info("%s cannot evaluate the job's metrics on its data: no evaluation sums asked of its cohorts",
                         caller)
            if request.released_over_model and caller not in self._released_unchanged:
                # it released a sum over this model and declines every round over it: not drawn until it changes
                self._released_unchanged[caller] = RELEASED_UNCHANGED
            if request.out_of_budget and caller not in self._out_of_budget:
                # the site's word that its budget is spent: drawing it again would only cost a slot
                self._out_of_budget[caller] = why
                log.info("%s is out of its own privacy budget: not drawn again in this run", caller)
            log.info("round %d (attempt %d): %s declined at %s: %s", rnd.number, rnd.attempt, caller,
                     rnd.stage.label, why)
            self._cond.notify_all()
            return pb.Ack(round=rnd.number, stage=rnd.stage.wire, detail="declined")  # type: ignore[arg-type]

    def _refuse_at_commit(self, rnd: _Round, caller: str, sid: int, problem: str,
                          what: str = "acceptance") -> MalformedMessage:
        """A cohort member's acceptance (or decline) refused (lock held): it is out of the round at
        once, as if it had declined (:meth:`_refuse_message`); one site declaring an out-of-range
        weight cost every round it was drawn for a stage timeout."""
        if sid not in rnd.beacon.commitments and not rnd.closing:  # a closing beacon is the driver's
            rnd.beacon.decline(sid)
        rnd.weights.pop(sid, None)
        return self._refuse_message(rnd, caller, Stage.COMMIT, problem, f"its {what} was refused: {problem}")

    def reveal_contribution(self, caller: str, request: pb.RevealRequest) -> pb.Ack:
        """A member's graph-seed reveal. One refused is a withheld reveal, at once: the attempt ends
        when the stage closes, and the member is barred from the rest of the round."""
        bad = None if len(request.contribution) == 32 else \
            f"contribution: expected 32 bytes, got {len(request.contribution)}"
        with self._cond:
            _client, rnd, sid = self._sender(caller, request.header, Stage.REVEAL, "RevealContribution", bad)
            if bad is not None:
                raise self._refuse_message(rnd, caller, Stage.REVEAL, bad)
            try:
                rnd.beacon.receive_reveal(sid, bytes(request.contribution))
            except BeaconError as err:
                raise self._refuse_message(rnd, caller, Stage.REVEAL, f"contribution: {err}") from None
            rnd.submitted.setdefault(caller, set()).add(Stage.REVEAL)
            self._notify_if_stage_complete(rnd)
            return pb.Ack(round=rnd.number, stage="STAGE_REVEAL", detail="accepted")

    def advertise_keys(self, caller: str, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        sizes = (("encryption_public_key", (PUBLIC_KEY_BYTES,)), ("masking_public_key", (PUBLIC_KEY_BYTES,)),
                 ("signature", (0, SIGNATURE_BYTES)), ("share_key_proof", (0, POSSESSION_PROOF_BYTES)))
        problem = next((f"{name}: expected {' or '.join(map(str, allowed))} bytes, got {len(getattr(request, name))}"
                        for name, allowed in sizes if len(getattr(request, name)) not in allowed), None)
        keys = (bytes(request.encryption_public_key), bytes(request.masking_public_key), bytes(request.signature),
                bytes(request.share_key_proof))
        # The identity signature, active mode's largest server cost, is checked on this request's
        # thread outside the lock, so the cohort's advertisements are verified in parallel.
        return self._feed_checked_outside_lock(
            caller, request.header, Stage.TRAINING, "AdvertiseKeys",
            lambda round_id, sid: sa.AdvertiseKeys(round_id, sid, *keys),
            lambda secagg, _sid, msg: secagg.verify_advertisements([msg]), problem)

    def share_keys(self, caller: str, request: pb.ShareKeysRequest) -> pb.Ack:
        boxes: dict[int, bytes] = {}
        problem = None
        for i, share in enumerate(request.shares):
            if share.peer_id in boxes:
                problem = f"shares[{i}].peer_id: {share.peer_id} appears twice"
                break
            if not 0 < len(share.ciphertext) <= MAX_SHARE_BOX_BYTES:
                problem = f"shares[{i}].ciphertext: {len(share.ciphertext)} bytes is not a share box"
                break
            boxes[int(share.peer_id)] = bytes(share.ciphertext)
        with self._cond:
            _client, rnd, sid = self._sender(caller, request.header, Stage.SHARE_KEYS, "ShareKeys", problem)
            if problem is None and len(boxes) > rnd.plan.cohort_size:
                problem = f"shares: {len(boxes)} boxes for a cohort of {rnd.plan.cohort_size}"
            if problem is not None:
                raise self._refuse_message(rnd, caller, Stage.SHARE_KEYS, problem)
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
            try:
                vector = decode_ring_vector(data, rnd.plan.dimension, rnd.plan.ring_bits)
            except MalformedMessage as err:
                raise self._refuse_message(rnd, caller, Stage.MASKED_INPUT, str(err)) from None
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
            res.on_refused = self._refuse_upload
            return res

    def _upload_book(self) -> UploadBook:
        if self._uploads is None:
            self._uploads = UploadBook()
        return self._uploads

    def _release_upload(self, res: UploadReservation, counted: bool) -> None:
        with self._cond:
            self._upload_book().release(res, counted)

    def _refuse_upload(self, res: UploadReservation, problem: str) -> None:
        """An upload refused after its reservation (a total size other than the masked input's, a chunk
        that overruns it or does not parse; not a stream that ends short, which a broken connection can
        look like): the site is out of the stage at once, as for a refused ``SubmitMaskedInput``. Over
        gRPC every masked input above 64 KiB takes this path (review of 2026-12-08: the stage still
        waited out its deadline for it)."""
        with self._cond:
            rnd = self._round
            if rnd is not None and self._upload_wanted(res):  # the reservation's round and stage, still open
                self._refuse_message(rnd, res.site, Stage.MASKED_INPUT, problem)

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
            return self._published_model().data

    def confirm_survivors(self, caller: str, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        bad = None if len(request.signature) == SIGNATURE_BYTES else \
            f"signature: expected {SIGNATURE_BYTES} bytes, got {len(request.signature)}"
        with self._cond:
            _client, rnd, sid = self._sender(caller, request.header, Stage.CONSISTENCY, "ConfirmSurvivors", bad)
            if bad is not None:
                raise self._refuse_message(rnd, caller, Stage.CONSISTENCY, bad)
            msg = sa.ConsistencyCheckResponse(rnd.config.round_id, sid, bytes(request.signature))
            return self._feed(rnd, sid, msg, Stage.CONSISTENCY, caller)

    def unmask(self, caller: str, request: pb.UnmaskRequest) -> pb.Ack:
        limbs: dict[int, int] = {pb.SHARE_KIND_SELF_MASK_SEED: sa.SELF_MASK_LIMBS,
                                 pb.SHARE_KIND_MASKING_KEY: sa.MASK_KEY_LIMBS}
        groups: dict[int, tuple[list[int], list[bytes], list[bytes]]] = {kind: ([], [], []) for kind in limbs}
        problem = None
        for i, share in enumerate(request.shares):
            group = groups.get(share.kind)
            data = share.share
            if group is None:
                problem = f"shares[{i}].kind: {share.kind} is not a share kind"
            elif len(data) != 4 * limbs[share.kind]:
                problem = f"shares[{i}].share: expected {4 * limbs[share.kind]} bytes, got {len(data)}"
            elif len(share.salt) != sa.SALT_BYTES:
                problem = f"shares[{i}].salt: expected {sa.SALT_BYTES} bytes, got {len(share.salt)}"
            if group is None or problem is not None:
                break  # refused once the session is known, before the message is built
            group[0].append(share.owner_id)
            group[1].append(data)
            group[2].append(share.salt)
        # each kind's shares as one (owners, limbs) matrix and its salts as one (owners, 16), parsed in one step
        owners = {kind: np.asarray(group[0], dtype=np.uint32) for kind, group in groups.items()}
        rows = {kind: np.frombuffer(b"".join(group[1]), dtype="<u4").astype(np.uint32).reshape(-1, limbs[kind])
                for kind, group in groups.items()}
        salts = {kind: np.frombuffer(b"".join(group[2]), dtype=np.uint8).reshape(-1, sa.SALT_BYTES)
                 for kind, group in groups.items()}
        def message(round_id: int, sid: int) -> sa.UnmaskingResponse:
            return sa.UnmaskingResponse(
                round_id, sid,
                owners[pb.SHARE_KIND_SELF_MASK_SEED], rows[pb.SHARE_KIND_SELF_MASK_SEED],
                owners[pb.SHARE_KIND_MASKING_KEY], rows[pb.SHARE_KIND_MASKING_KEY],
                salts[pb.SHARE_KIND_SELF_MASK_SEED], salts[pb.SHARE_KIND_MASKING_KEY],
            )

        # Each share's commitment (a hash per share, about 250 per site at n = 1,000) is checked on this
        # request's thread outside the lock.
        return self._feed_checked_outside_lock(
            caller, request.header, Stage.UNMASKING, "Unmask", message,
            lambda secagg, sid, msg: secagg.verify_unmasking(sid, msg), problem)

    def _feed_checked_outside_lock(
        self, caller: str, header: pb.RequestHeader, stage: Stage, rpc: str,
        build: Callable[[int, int], MessageT], check: Callable[[SecAggServer, int, MessageT], object],
        problem: str | None = None,
    ) -> pb.Ack:
        """Feed the message ``build(round id, secagg id)`` to the caller's round after ``check`` ran on
        it on this request's thread, outside the lock. The check only records what it found sound, which
        the round then does not check again when fed (under the lock); anything else is checked there.
        The session and the round are looked up again afterwards: a message for an attempt that moved
        on is built anew (and checked when fed). A request found malformed while it was parsed
        (``problem``) is refused once its session and round are known (:meth:`_refuse_message`)."""
        with self._cond:
            client, rnd, sid = self._sender(caller, header, stage, rpc, problem)
            if problem is not None:
                raise self._refuse_message(rnd, caller, stage, problem)
            msg = build(rnd.config.round_id, sid)
            secagg = rnd.secagg
        if secagg is not None:
            check(secagg, sid, msg)
        with self._cond:
            if self._clients.get(caller) is not client:
                raise OutOfOrder(f"{rpc}: the session was replaced while the request was checked; Join again")
            now, now_sid = self._round_for(client, header, stage, rpc)
            if now is not rnd or now_sid != sid:
                msg = build(now.config.round_id, now_sid)
            return self._feed(now, now_sid, msg, stage, caller)

    def _published_model(self) -> PublishedModel:
        """The current model as the transport delivers it (serialized once per version)."""
        return self.model_delivery.publish(self.model.version, self.model.params,
                                           [(t.name, t.shape) for t in self.model_spec.tensors])

    def _model_pb(self) -> pb.Model:
        return self._published_model().announced
