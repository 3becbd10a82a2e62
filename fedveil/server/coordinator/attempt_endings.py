"""How an attempt ends when it does not complete: rejected, aborted or abandoned.

A **rejected** round is skipped (model unchanged, the round counted, its release kept in the
ledger) and the job goes on; an **aborted** attempt is retried with a new cohort and nonce, and
counts against ``--max-round-attempts`` unless its cause is left out of the retries (a withheld
graph-seed reveal, or a site convicted by a share-box complaint); an **abandoned** one ends because
the server stops or fails.
"""

from __future__ import annotations

import numpy as np

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator.state import SECURE_SUM_ROW, CoordinatorBase, Stage, _Round, log
from fedveil.server.events import EvaluationRecorded, RoundAborted, RoundRejected

RELEASED_UNCHANGED = "released a sum over the unchanged model (it declines a replay)"
"""Why a site is left out of cohorts until the model changes (:meth:`AttemptEndingsMixin._leave_out_releasers`)."""


class AttemptEndingsMixin(CoordinatorBase):
    """Rejected rounds, aborted attempts, abandoned rounds, and the secure evaluation's record."""

    def _reject_round(self, rnd: _Round, reason: str, survivors: int) -> str:
        """The unmasked sum is not one honest sites can produce: skip the round (model unchanged, the
        round counted, its release kept in the ledger) and go on — a retry would let a malicious site
        stall the job."""
        number = rnd.number
        with self._cond:
            self._record_rejected(number, rnd.attempt, reason, survivors, rnd.plan.threshold)
            self._leave_out_releasers(rnd)
            self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, f"rejected: {reason}", ())
        self.listeners.emit(RoundRejected(self.run_id, number, rnd.attempt, reason))
        return "rejected"

    def _record_rejected(self, number: int, attempt: int, reason: str, survivors: int, threshold: int) -> None:
        """Store the round as rejected with the checkpoint that skips it, then skip it (model unchanged)."""
        ledger_json = self.model.ledger.to_json() if self.model.ledger is not None else None
        self.store.complete_round(
            self.run_id, number, attempt, survivors=survivors, aggregate=np.zeros(0, np.float32),
            aggregate_digest="", model=self.model.params, state=self.model.state_dict(skipping=True),
            ledger_json=ledger_json, stats={"rejected": reason, "threshold": threshold}, status="rejected",
            reason=reason)
        self.model.skip()
        self._model_released_unchanged = True  # the next model is one the sites released a sum over
        self._rejected_rounds += 1
        log.warning("round %d rejected (model unchanged, the job goes on): %s", number, reason)

    def _leave_out_releasers(self, rnd: _Round) -> None:
        """After a rejected or skipped round (lock held): its members that sent unmasking shares released a
        sum over the model the next round keeps (a share that did not arrive: the site's decline says so).
        Those with no noise they rely on over a second release decline every round over it (their replay
        defence), so draw the next cohorts from the others until the model changes. Before, a job without
        user-level DP drew them again, every attempt was declined, and one site that spoiled a round (a bad
        dealing, a sum out of bounds) ended the job. A site that declines for this reason says so too
        (``released_over_model``), which covers a resumed server that does not know the cohort."""
        for name in rnd.cohort:  # a site records the release as it sends its unmasking shares
            if Stage.UNMASKING in rnd.submitted.get(name, set()) and self._declines_replay(name):
                self._released_unchanged.setdefault(name, RELEASED_UNCHANGED)

    def _declines_replay(self, name: str) -> bool:
        """Whether ``name`` declines a second release over one model: without DP, and under central DP
        unless it trusts the server to add the noise (the sites' rule, ``ClientMechanism.protects_replays``);
        local and distributed DP draw fresh noise on the site for every release."""
        mode = self.config.privacy.mode
        client = self._clients.get(name)
        return mode == "none" or (mode == "central" and not (client is not None and client.trust_server))

    def _mark_release(self, rnd: _Round) -> None:
        """The training round's masked inputs are in (lock held): from here its sum can be released.

        The ledger keeps the round's entry and the store marks the attempt before any unmasking share
        is asked for. A server killed (``kill -9``) after this point resumes by skipping the round, with
        the release counted (:meth:`_skip_released_rounds`). Before, the resumed server took the
        reservation back and redid the round: under no DP every site that had sent its shares declined
        the replay and the job failed; under user-level DP the sites took it, and the server's ledger
        counted one release of the two."""
        self.model.keep_budget(rnd.number)
        ledger_json = self.model.ledger.to_json() if self.model.ledger is not None else None
        self.store.mark_release(self.run_id, rnd.number, rnd.attempt, Stage.MASKED_INPUT.label, ledger_json)

    def _skip_released_rounds(self) -> None:
        """At resume, before the unfinished attempts are marked interrupted: a training round whose
        attempt was killed after :meth:`_mark_release` is skipped like a rejected one (model unchanged,
        the release kept in the ledger), as a stop in that stage is (:meth:`_abandon`)."""
        for number, attempt, threshold in self.store.released_unfinished_rounds(self.run_id):
            if number != self.model.version + 1:
                continue  # not the round after the checkpoint: a round starts only once the one before ended
            self._record_rejected(number, attempt, "the server stopped after the masked inputs were in, when the "
                                  "sites' unmasking shares could have left (skipped at resume)", 0, threshold)

    def _abort_attempt(self, rnd: _Round, stage: Stage, answered: int) -> str:
        """Record an aborted attempt (lock held). Once masked inputs were in and unmasking shares
        were asked for, the sum could have been released: under DP the attempt stays in the ledger
        as a release (Bonawitz et al.'s retries are new releases, not refunds)."""
        number = rnd.number
        if rnd.secagg is not None:
            reason = rnd.secagg.abort_reason or "aborted"
        else:
            reason = rnd.beacon.abort_reason or "aborted"
        if stage >= Stage.CONSISTENCY:  # the ledger kept and stored it when the masked inputs were in (_mark_release)
            reason += " (after masked inputs: counted as a release in the privacy ledger)"
        elif rnd.purpose == pb.ROUND_PURPOSE_TRAIN:
            self.model.cancel_budget(number)
        self.store.abort_round(self.run_id, number, rnd.attempt, reason, answered)
        self._aborted_attempts += 1
        log.warning("round %d attempt %d aborted: %s", number, rnd.attempt, reason)
        self.listeners.defer(RoundAborted(self.run_id, number, rnd.attempt, stage.label, reason))
        self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, reason, ())
        # members enough decliners refused for their credential (refusal_tally.py) are barred from
        # the rest of the round; this attempt does not count against the limit
        if stage == Stage.COMMIT and self._bar_refused_members(rnd):
            self._tries[number] -= 1
            return "withheld"
        if stage == Stage.REVEAL and rnd.beacon.withheld:
            # each withholder costs one attempt and is barred from the rest of the round, so a site
            # cannot make a round fail by withholding; this attempt does not count against the limit
            barred = self._barred.setdefault(number, {})
            barred.update({rnd.names[s]: "withheld a graph-seed reveal" for s in rnd.beacon.withheld})
            self._tries[number] -= 1
            return "withheld"
        return self._misconduct_outcome(rnd) or "aborted"

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

    def _abandon(self, rnd: _Round, reason: str, *, stopping: bool = False) -> None:
        if stopping and rnd.purpose == pb.ROUND_PURPOSE_TRAIN and rnd.stage == Stage.UNMASKING:
            # The sites may have sent their unmasking shares: each declines this round from now on, so a
            # resumed server could never redo it (the job failed), and its ledger entry is a release.
            # Skip the round as a rejected one: model unchanged, release kept (_mark_release; review of
            # 2026-12-07).
            self._reject_round(rnd, f"{reason} during unmasking, after the sites' shares could have left", 0)
            return
        if rnd.purpose == pb.ROUND_PURPOSE_TRAIN:
            self.model.cancel_budget(rnd.number)
        self.store.abort_round(self.run_id, rnd.number, rnd.attempt, reason, None)
        self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, reason, ())
