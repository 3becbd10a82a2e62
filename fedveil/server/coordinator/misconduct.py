"""Sites proven to deviate from the protocol: share-box complaints, shares that do not open their
owner's commitment or do not reconstruct, and who may not be drawn.

A site that seals share boxes its holders cannot open made every attempt of a round abort, and
nothing said who was at fault, so it was drawn again (the third attacker review). A holder now
answers the masked-input stage with a *verifiable* complaint instead
(:mod:`fedveil.secagg.share_complaints`): the pair's X25519 point with a DLEQ proof that it is the
pair's, from which the server opens the stored box itself. The judgement is a proof either way:
a sender whose box does not open under the proven key, or a complainer whose proof fails or
whose box opens after all, is **convicted** and left out of every later cohort of the job. An
attempt that aborts with someone convicted does not count against ``--max-round-attempts``, so a
single site cannot make a round fail this way.
"""

from __future__ import annotations

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.complaint_kinds import SHARE_COMPLAINT_KINDS
from fedveil.protocol.errors import MalformedMessage, Replayed
from fedveil.secagg import errors as sa_errors
from fedveil.secagg.share_complaints import ComplaintVerdict, ShareComplaint
from fedveil.server.coordinator.state import CoordinatorBase, Stage, _Round, log


def complaints_from_pb(request: pb.ShareComplaintsRequest, cohort_size: int) -> list[ShareComplaint]:
    """The request's complaints as secagg values; the shape is checked here, the evidence by the judge."""
    if not request.complaints:
        raise MalformedMessage("complaints: a complaint names at least one sender")
    if len(request.complaints) >= cohort_size:
        raise MalformedMessage(f"complaints: {len(request.complaints)} for a cohort of {cohort_size}")
    out: list[ShareComplaint] = []
    for i, item in enumerate(request.complaints):
        kind = SHARE_COMPLAINT_KINDS.get(item.kind)
        if kind is None:
            raise MalformedMessage(f"complaints[{i}].kind: {item.kind} is not a complaint kind")
        out.append(ShareComplaint(int(item.sender_id), kind, bytes(item.shared_point), bytes(item.proof)))
    return out


class MisconductMixin(CoordinatorBase):
    """Share-box complaints and the sites convicted by them."""

    def complain_about_shares(self, caller: str, request: pb.ShareComplaintsRequest) -> pb.Ack:
        """A holder leaves the masked-input stage naming the boxes it could not open; each complaint
        is judged at once and whoever it proves at fault is convicted."""
        with self._cond:
            client = self._session(caller, request.header, "ComplainAboutShares")
            rnd, sid = self._round_for(client, request.header, Stage.MASKED_INPUT, "ComplainAboutShares")
            if self._upload_book().active(caller, rnd.nonce, Stage.MASKED_INPUT):
                raise Replayed("ComplainAboutShares: this site's masked input is being uploaded")
            assert rnd.secagg is not None
            try:
                complaints = complaints_from_pb(request, rnd.plan.cohort_size)
                verdicts = rnd.secagg.judge_complaints(sid, complaints)
            except sa_errors.UnexpectedMessageError as err:  # not in the stage: nothing to refuse
                raise MalformedMessage(f"complaints: {err}") from None
            except MalformedMessage as err:
                raise self._refuse_message(rnd, caller, Stage.MASKED_INPUT, str(err)) from None
            except sa_errors.SecAggError as err:
                raise self._refuse_message(rnd, caller, Stage.MASKED_INPUT, f"complaints: {err}") from None
            senders = ", ".join(rnd.names.get(c.sender, str(c.sender)) for c in complaints)
            rnd.dropped[caller] = (Stage.MASKED_INPUT.label, f"could not open the share boxes of {senders}")
            for verdict in verdicts:
                self._record_verdict(rnd, caller, verdict)
            self._cond.notify_all()
            upheld = sum(v.upheld for v in verdicts)
            return pb.Ack(round=rnd.number, stage=Stage.MASKED_INPUT.wire,  # type: ignore[arg-type]
                          detail=f"{upheld} of {len(verdicts)} complaint(s) upheld")

    def _record_verdict(self, rnd: _Round, complainer: str, verdict: ComplaintVerdict) -> None:
        sender = rnd.names.get(verdict.complaint.sender, str(verdict.complaint.sender))
        if verdict.guilty is None:
            log.warning("round %d (attempt %d): %s's complaint about %s's share box proves nothing: %s",
                        rnd.number, rnd.attempt, complainer, sender, verdict.reason)
            return
        guilty = rnd.names[verdict.guilty]
        self._convict(guilty, f"round {rnd.number}, attempt {rnd.attempt}: {verdict.reason} "
                              f"(client {verdict.guilty} is {guilty}; the complaint came from {complainer})")

    def _convict_unmasking_misconduct(self, rnd: _Round) -> None:
        """Convict whoever the unmasking stage proved at fault (lock held): holders that returned shares
        their owners never committed to, and owners whose committed shares give no secret or not the
        one they advertised (:mod:`fedveil.secagg.share_commitments`)."""
        assert rnd.secagg is not None
        for sid, why in sorted(rnd.secagg.misconduct.items()):
            name = rnd.names.get(sid)
            if name is not None:
                self._convict(name, f"round {rnd.number}, attempt {rnd.attempt}: client {sid} ({name}) {why}")

    def _convict(self, name: str, reason: str) -> None:
        """Leave ``name`` out of every later cohort of this job, a resumed one too (lock held)."""
        if name not in self._convicted:
            self._convicted[name] = reason
            self.store.record_conviction(self.run_id, name, reason)
            log.error("%s is left out of the rest of the job: %s", name, reason)

    def _excluded(self, number: int) -> set[str]:
        """Sites that may not be drawn for round ``number``: barred from it or for their roster
        entry, convicted, out of their own privacy budget, or declining a replay of the unchanged model."""
        return (set(self._barred.get(number, {})) | set(self._refused_now()) | set(self._convicted)
                | set(self._out_of_budget) | set(self._released_unchanged))

    def _exclusion_reasons(self, number: int) -> str:
        """Who is left out of round ``number``, and why, in one line."""
        by_reason: dict[str, list[str]] = {}
        for name, why in sorted({**self._released_unchanged, **self._barred.get(number, {}),
                                 **self._refused_now()}.items()):
            if name not in self._convicted:
                by_reason.setdefault(why, []).append(name)
        parts = [f"{', '.join(names)} {why}" for why, names in by_reason.items()]
        parts += [f"{name} was convicted ({why})" for name, why in sorted(self._convicted.items())]
        spent = sorted(set(self._out_of_budget) - set(self._convicted))
        if spent:
            parts.append(f"{', '.join(spent)} declined for their own privacy budget")
        return "; ".join(parts)

    def _misconduct_outcome(self, rnd: _Round) -> str | None:
        """'convicted' when someone was convicted in this aborted attempt (lock held): the attempt
        does not count against the limit, since the culprit is not drawn again."""
        if rnd.secagg is None:
            return None
        if rnd.secagg.misconduct:  # an attempt that aborted at unmasking (an evaluation round's)
            self._convict_unmasking_misconduct(rnd)
        if not (rnd.secagg.blamed or rnd.secagg.misconduct):
            return None
        self._tries[rnd.number] -= 1
        return "convicted"
