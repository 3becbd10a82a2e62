"""Sites' metric and privacy reports: range-checked, labelled, stored."""

from __future__ import annotations

import hmac
from typing import Any

from fedveil.dp.accounting import DpEvent
from fedveil.dp.ledger import PrivacyLedger
from fedveil.protocol import ROUND_NONCE_BYTES
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import (
    MalformedMessage,
    OutOfOrder,
    PermissionDenied,
    ProtocolError,
    Replayed,
    StageClosed,
)
from fedveil.server.coordinator.state import (
    CoordinatorBase,
    _Client,
    _Round,
    log,
)
from fedveil.server.reports import (
    CheckedReport,
    SpendContext,
    SpendVerdict,
    check_report,
    ledger_details,
    spend_record,
    verify_spend,
)


class SiteReportsMixin(CoordinatorBase):
    """Sites' metric and privacy reports: range-checked, labelled, stored."""

    def report_metrics(self, caller: str, request: pb.MetricsReport) -> pb.Ack:
        refused: MalformedMessage | None = None
        try:
            report = check_report(request)  # every number range-checked before anything is recorded
        except MalformedMessage as err:
            refused = err
        if refused is None and report.metrics and self._evaluation_mode != "clear":
            # per-site metrics are an oracle on a site's data: only when the job asks for them in the clear
            mode = self._evaluation_mode
            raise MalformedMessage(f"metrics: per-site metrics are not accepted by this job (evaluation {mode!r}; "
                                   + ("they travel only as secure sums)" if mode == "secure" else "it asks for none)"))
        with self._cond:
            try:
                client = self._session(caller, request.header, "ReportMetrics")
            except ProtocolError:
                if refused is not None:  # the report's own fault first, as before the session was known
                    raise refused from None
                raise
            header = request.header
            ev = self._evaluation
            if ev is not None and header.round == ev.phase and hmac.compare_digest(header.round_nonce, ev.nonce):
                if caller not in ev.participants:
                    raise PermissionDenied("ReportMetrics: you were not asked to evaluate the final model")
                if caller in ev.reported:
                    raise Replayed("ReportMetrics: already received for the final evaluation")
                if refused is None and request.model_version != ev.version:
                    refused = MalformedMessage(f"model_version: expected {ev.version}, got {request.model_version}")
                if refused is not None:
                    # the site sends no other: the evaluation does not wait out its deadline for it
                    ev.participants.discard(caller)
                    log.info("final evaluation: %s's report was refused (%s)", caller, refused)
                    self._cond.notify_all()
                    raise refused
                self.store.record_evaluation(self.run_id, ev.version, caller, report.num_examples, report.metrics)
                ev.reported.add(caller)
                self._cond.notify_all()
                return pb.Ack(round=ev.phase, stage=pb.STAGE_EVALUATION, detail="accepted")
            if refused is not None:
                raise refused
            rnd, _sid = self._round_for_metrics(client, header)
            if caller in rnd.evaluated:
                raise Replayed(f"ReportMetrics: already received for round {rnd.number}")
            if request.model_version != self.model.version:
                raise MalformedMessage(f"model_version: expected {self.model.version}, got {request.model_version}")
            rnd.evaluated.add(caller)  # taken now: a second report cannot race this one
            earlier = self.model.client_events(caller)
        try:
            # The RDP recomputation of the site's claim can take seconds for parameters the server has
            # not seen: done outside the lock, so one site's report never stalls the job (at most one
            # per site and round reaches here, and it holds only this handler's worker).
            verdict = self._verify_reported_spend(caller, report, earlier)
            with self._cond:
                if self._round is not rnd:
                    raise StageClosed(f"ReportMetrics: round {rnd.number} ended while the report was checked")
                privacy, ledger = self._reported_spend(rnd.number, caller, report, verdict)
                # stored in one transaction, and only then kept: a failed store leaves the retry possible
                self.store.record_client_report(
                    self.run_id, model_version=self.model.version, round_number=rnd.number, client_name=caller,
                    num_examples=report.num_examples, metrics=report.metrics, privacy=privacy,
                    ledger_json=ledger.to_json() if ledger is not None else None,
                )
                if ledger is not None:
                    self.model.ledger = ledger
                return pb.Ack(round=rnd.number, stage=rnd.stage.wire, detail="accepted")  # type: ignore[arg-type]
        except BaseException:
            with self._cond:
                rnd.evaluated.discard(caller)
            raise

    def _verify_reported_spend(self, caller: str, report: CheckedReport,
                               earlier: list[DpEvent]) -> SpendVerdict | None:
        spend = report.privacy
        if spend is None:
            return None
        cfg = self.config
        context = SpendContext(
            delta=cfg.privacy.delta,
            noise_multiplier=self.model.mechanism.required_site_noise_multiplier,
            local_epochs=max(cfg.training.local_epochs or self.task.local_epochs, 1),
        )
        verdict = verify_spend(spend, report.num_examples, earlier, context, self.model.verifier())
        if not verdict.verified:
            log.warning("the privacy spend %s reported is unverified: %s", caller, "; ".join(verdict.reasons))
        return verdict

    def _reported_spend(
        self, round_number: int, caller: str, report: CheckedReport, verdict: SpendVerdict | None
    ) -> tuple[dict[str, Any] | None, PrivacyLedger | None]:
        """A site's reported DP-SGD spend, checked against what the server knows (``fedveil.server.reports``):
        the row to store (labelled as reported, with the verdict) and a copy of the ledger with the spend."""
        spend = report.privacy
        if spend is None or verdict is None:
            return None, None
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
