"""The job: rounds one after another, retries, final evaluation and the summary."""

from __future__ import annotations

import os
import time

from fedveil.dp.bounded import WorkBound
from fedveil.dp.ledger import FEDERATION, PrivacyLedger
from fedveil.metrics import weighted_metrics
from fedveil.protocol import ROUND_NONCE_BYTES
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator.attempt_endings import AttemptEndingsMixin
from fedveil.server.coordinator.misconduct import MisconductMixin
from fedveil.server.coordinator.refusal_tally import RefusalTallyMixin
from fedveil.server.coordinator.rounds import RoundDriverMixin
from fedveil.server.coordinator.secagg_bridge import SecAggBridgeMixin
from fedveil.server.coordinator.sessions import SessionsMixin
from fedveil.server.coordinator.site_reports import SiteReportsMixin
from fedveil.server.coordinator.state import (
    MAX_STEER_S,
    JobError,
    JobSummary,
    _Evaluation,
    log,
)
from fedveil.server.events import (
    JobFinished,
)
from fedveil.server.privacy_view import party_figures


class Coordinator(SessionsMixin, SecAggBridgeMixin, MisconductMixin, RefusalTallyMixin, SiteReportsMixin,
                  RoundDriverMixin, AttemptEndingsMixin):
    """Runs one federated job against a :class:`RunStore`; see :mod:`fedveil.server.coordinator`."""

    def run(self) -> JobSummary:
        """Run the job to completion (or until :meth:`stop`); returns the summary."""
        cfg = self.config
        status = "completed"
        message = ""
        self._budget_message = ""
        if self.finished is not None:
            return self._report_finished()
        refusal = self.model.mechanism.evaluation_refusal()
        if refusal is not None and cfg.evaluation.mode != "off" and (cfg.evaluation.each_round or cfg.evaluation.final):
            log.info("federated evaluation off: %s", refusal)
        while self.model.version < cfg.schedule.rounds:
            with self._cond:
                available = self._wait_for_cohort(self.model.version + 1)
            if available is None and self._no_cohort is not None:
                status, message = "failed", self._no_cohort
                log.error("%s", message)
                break
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
            if outcome in ("withheld", "convicted", "rejected"):
                continue
            if outcome == "budget":
                status, message = "budget_exhausted", f"stopped early: {self._budget_message}"
                break
            if outcome == "aborted" and self._tries.get(number, 0) >= cfg.schedule.max_round_attempts:
                status = "failed"
                message = f"round {number} aborted {cfg.schedule.max_round_attempts} times (see the store for reasons)"
                break
        if status in ("completed", "budget_exhausted") and cfg.evaluation.final and cfg.evaluation.max_per_job \
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
        site_epsilon, unverified = _site_figures(ledger)
        with self._cond:
            lifted = tuple(sorted(self._lifted_bars()))
        summary = JobSummary(
            run_id=self.run_id, status=status, completed_rounds=self.model.version, total_rounds=cfg.schedule.rounds,
            resumed_from=self.resumed_from, aborted_attempts=self._aborted_attempts, dropouts=self._dropouts,
            final_metrics=self._final_metrics, epsilon=epsilon,
            delta=cfg.privacy.delta if epsilon is not None else None,
            message=message, rejected_rounds=self._rejected_rounds, site_epsilon=site_epsilon,
            unverified_sites=unverified, convicted=dict(self._convicted),
            barred={name: why for name, (_digest, why) in self._refused_entries.items()}, bars_lifted=lifted,
            out_of_budget=dict(self._out_of_budget),
        )
        if status != "stopped":
            self.store.finish_run(self.run_id, status, summary.to_dict())
        self.listeners.emit(JobFinished(self.run_id, summary.to_dict()))
        if status != "stopped":
            self._announce_done(message)
        return summary

    def _announce_done(self, message: str) -> None:
        """Tell every client the job is over; wait up to ``linger`` seconds for them to hear it, and
        for the sites that pace steering sent away until they are due back (the server said when to
        return: it keeps that promise rather than leave them to find it gone)."""
        with self._cond:
            self._done = pb.JobDone(
                run_id=self.run_id, completed_rounds=self.model.version,
                final_metrics=[pb.Metric(name=k, value=v) for k, v in self._final_metrics.items()],
                summary=message,
            )
            self._cond.notify_all()
            now = self._clock()
            away = self._due_back()
            linger_until = now + self.config.schedule.linger
            if away:
                latest = max(c.back_by for c in away) + 2.0  # its poll's way here
                linger_until = max(linger_until, min(latest, now + MAX_STEER_S + self.config.schedule.linger))

            self._wait_until(lambda: all(c.job_done_sent for c in self._connected()), linger_until)

    def _report_finished(self) -> JobSummary:
        data = self.finished or {}
        self._final_metrics = {str(k): float(v) for k, v in (data.get("final_metrics") or {}).items()}
        message = f"run {self.run_id} had already finished: {data.get('message', '')}".strip()
        summary = JobSummary(
            run_id=self.run_id, status=str(data.get("status", "completed")), completed_rounds=self.model.version,
            total_rounds=self.config.schedule.rounds, resumed_from=self.model.version,
            aborted_attempts=self._aborted_attempts, dropouts=self._dropouts, final_metrics=self._final_metrics,
            epsilon=data.get("epsilon"), delta=data.get("delta"), message=message,
            site_epsilon={str(k): float(v) for k, v in (data.get("site_epsilon") or {}).items()},
            unverified_sites=tuple(str(s) for s in data.get("unverified_sites") or ()),
            convicted={str(k): str(v) for k, v in (data.get("convicted") or {}).items()},
            barred={str(k): str(v) for k, v in (data.get("barred") or {}).items()},
            bars_lifted=tuple(str(s) for s in data.get("bars_lifted") or ()),
            out_of_budget={str(k): str(v) for k, v in (data.get("out_of_budget") or {}).items()},
        )
        self._announce_done(message)
        return summary

    def _secure_final_evaluation(self) -> None:
        """The final model's metrics as one secure sum over the cohort (an evaluation-only round)."""
        cfg = self.config
        phase = cfg.schedule.rounds + 1
        if self._model_released_unchanged:
            log.info("final evaluation skipped: the last round was rejected or skipped, and the sites that evaluate "
                     "decline a model they released a sum over")
            return
        for _ in range(min(cfg.schedule.max_round_attempts, cfg.evaluation.max_per_job)):  # each attempt asks again
            with self._cond:
                available = [n for n in self._draw_pool(phase)[2] if self._evaluates(n)]
            if len(available) < cfg.schedule.min_clients:
                log.info("final evaluation skipped: %d connected sites evaluate, fewer than %d", len(available),
                         cfg.schedule.min_clients)
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
            participants = set(self._drawable())
            if not participants:
                return
            now, wall = self._clock(), time.time()
            ev = _Evaluation(version=self.model.version, nonce=os.urandom(ROUND_NONCE_BYTES),
                             phase=cfg.schedule.rounds + 1,
                             deadline=now + cfg.schedule.stage_timeout, deadline_wall=wall + cfg.schedule.stage_timeout,
                             participants=participants)
            self._evaluation = ev
            self._cond.notify_all()
            self._wait_until(lambda: ev.reported >= ev.participants, ev.deadline)
            self._evaluation = None
            self._past_nonces.add(ev.nonce)
        rows = self.store.evaluations(self.run_id, ev.version)
        self._final_metrics = weighted_metrics(rows)
        log.info("final evaluation of model %d by %d client(s): %s", ev.version, len(rows), self._final_metrics)


def _site_figures(ledger: PrivacyLedger | None) -> tuple[dict[str, float], tuple[str, ...]]:
    """Each site's latest sample-level ε in the ledger (sites that reported local DP), and the sites
    whose reports could not be verified; bounded like the dashboard's view (a claimed 1e8 steps under
    PLD falls back to RDP instead of computing for minutes)."""
    if ledger is None or not ledger.clients:
        return {}, ()
    figures = party_figures(ledger, WorkBound())
    latest = {site: rounds[max(rounds)] for site, rounds in figures.items() if site != FEDERATION and rounds}
    return ({site: fig.epsilon for site, fig in sorted(latest.items())},
            tuple(site for site, fig in sorted(latest.items()) if not fig.verified))
