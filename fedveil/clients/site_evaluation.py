"""A site's evaluations of the global models it receives, for a round's secure evaluation sums (or, where
the job and the site's policy both allow it, per-site metrics in the clear).

Every evaluation of a model the server chose is a query on the site's records, so they are bounded:
``max_evaluations_per_round`` per round number, ``max_evaluations_per_job`` for evaluation-only rounds.
A round asking for secure sums gets real ones or a decline, never zeros: zeros would leave the other
sites' sums alone in the secure total (the reviews of 2026-12-07). A later attempt over the model the
site already evaluated in that round gets the same answer again: nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedveil.clients.admission import Admission
from fedveil.clients.policy import PolicyViolation
from fedveil.clients.update import evaluation_layout
from fedveil.protocol import fedveil_pb2 as pb

if TYPE_CHECKING:
    from fedveil.clients.round import Round
    from fedveil.clients.session import Federation


def evaluated_before(federation: Federation, start: pb.RoundStart, admission: Admission) -> dict[str, float] | None:
    """The metrics this site computed earlier in this round for the same model, or None."""
    earlier = federation._round_evaluations.get((start.run_id, int(start.round)))
    return earlier[1] if earlier is not None and earlier[0] == admission.model_digest else None


def check_evaluation_left(federation: Federation, start: pb.RoundStart, admission: Admission) -> None:
    """Decline (:class:`PolicyViolation`) a round asking for secure sums this site can no longer answer.

    Zeros were what a site whose ``max_evaluations_per_round`` was spent added in a later attempt of
    the round: a server that spent the others' evaluations in an attempt without the victim (then
    aborted it) had the victim's metrics alone in the next attempt's "secure" sum."""
    if not admission.evaluate:  # admission declines a round asking for sums from a site with no evaluator
        return
    number, limit = int(start.round), federation.policy.max_evaluations_per_round
    if evaluated_before(federation, start, admission) is not None:
        return
    if not federation.state.evaluations_left(start.run_id, number, limit):
        raise PolicyViolation("max_evaluations_per_round", f"round {number}: this site already evaluated "
                              f"{limit} model(s) in this round and cannot answer for another one; adding "
                              "zeros instead would leave the other sites' sums alone in the secure total")


def evaluate_for_round(federation: Federation, rnd: Round, start: pb.RoundStart,
                       admission: Admission) -> str | None:
    """Set the round's metrics (``rnd._metrics``) from an evaluation of the global model before local
    training, where the round asks for them and the site's caps allow. Returns why the site must sit
    the round out instead (None: it may go on): metrics it cannot put into the secure sums as they are
    (:func:`unusable_metrics`)."""
    wants_clear = start.training.evaluate_global_model and not start.encoding.evaluation.dimension \
        and federation.policy.evaluation == "clear" and admission.evaluation_allowed
    if not (admission.evaluate or wants_clear) or federation.options.evaluate is None:
        return None
    assert federation.run_id is not None
    evaluation_only = start.purpose == pb.ROUND_PURPOSE_EVALUATE
    state, policy = federation.state, federation.policy
    earlier = evaluated_before(federation, start, admission)
    if earlier is not None:
        rnd._metrics = dict(earlier)  # the same model's answer again: nothing new, and never zeros
    elif state.evaluated(federation.run_id, rnd.number, policy.max_evaluations_per_round) \
            and (not evaluation_only or state.evaluated_for_job(federation.run_id, policy.max_evaluations_per_job)):
        rnd._metrics = run_evaluate(federation)
        federation._round_evaluations[(start.run_id, rnd.number)] = (admission.model_digest, dict(rnd._metrics))
    if rnd._metrics is not None:
        rnd._eval_examples = float(rnd._metrics.get("examples", federation.options.num_examples))
        if admission.evaluate:
            return unusable_metrics(start, rnd._metrics, rnd._eval_examples)
    return None


def unusable_metrics(start: pb.RoundStart, metrics: Mapping[str, object], examples: float) -> str | None:
    """Why this site's evaluation cannot go into the round's secure sums as it is (None: it can).

    The sums weight each site's metric by its examples; a metric that is missing or not finite used to
    get weight 0 (zeros), and one at the round's clip is the clip, a constant the server knows. A server
    whose crafted model made every other site's loss infinite (or past the clip) on their records, and
    the victim's finite, read the victim's loss alone from the "secure" sum (the review of 2026-12-07,
    second pass). The site then sits the round out instead."""
    layout = evaluation_layout(start.encoding)
    if layout is None:
        return None
    if not (math.isfinite(examples) and examples > 0):
        return f"its evaluation counted {examples!r} examples; zeros would leave the other sites' sums alone"
    bad = [name for name in layout.metrics if not _within(metrics.get(name), layout.value_clip)]
    if not bad:
        return None
    return (f"metric(s) {', '.join(bad)} missing, not finite or at the round's clip ±{layout.value_clip:g} on this "
            "site's data: they would add zeros or a constant beside the other sites' sums (a crafted model's way to "
            "isolate one site)")


def _within(value: object, clip: float) -> bool:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and abs(v) < clip


def run_evaluate(federation: Federation) -> dict[str, float]:
    """The user's evaluation function on the current model, leaving its train/eval mode as it was."""
    assert federation.options.evaluate is not None
    model = federation.model
    training = model.training
    try:
        return federation.options.evaluate(model)
    finally:
        model.train(training)
