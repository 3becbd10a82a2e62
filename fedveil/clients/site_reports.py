"""What a site reports outside secure aggregation: the metrics of its own evaluation (only when the
job and the site's policy both allow it in the clear) and its DP-SGD spend; and the final
per-site evaluation, answered empty unless the site's policy opts in."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from fedveil.clients import site_evaluation
from fedveil.clients.admission import evaluation_refusal
from fedveil.clients.participation import RoundLost
from fedveil.model_spec import ModelMismatchError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_vector
from fedveil.protocol.errors import MalformedMessage

if TYPE_CHECKING:
    from fedveil.clients.session import Federation

log = logging.getLogger("fedveil.client")


def report_metrics(
    federation: Federation, model_version: int, metrics: dict[str, float], spend: pb.LocalPrivacySpend | None = None,
    num_examples: int = 0,
) -> None:
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    if len(finite) < len(metrics):
        # e.g. ROC AUC on local data with one class only: undefined, so not reported (the server
        # refuses non-finite values, and the client must not fail over a metric)
        log.info("not reporting undefined metric(s): %s", ", ".join(sorted(set(metrics) - set(finite))))
    report = pb.MetricsReport(
        model_version=model_version,
        num_examples=max(int(num_examples or federation.options.num_examples), 0),
        metrics=[pb.Metric(name=k, value=v) for k, v in finite.items()],
    )
    if spend is not None:
        report.privacy.CopyFrom(spend)

    def call(header: pb.RequestHeader) -> pb.Ack:
        report.header.CopyFrom(header)
        return federation.transport.report_metrics(report)

    try:
        federation._send("ReportMetrics", call)
    except RoundLost as err:
        log.warning("metrics not accepted: %s", err)

def evaluate_final(federation: Federation, evaluate: pb.Evaluate) -> None:
    """Per-site final evaluation in the clear: only when this site's policy opts in too. Otherwise
    answer with no metrics, so the server need not wait for this client until the deadline."""
    metrics: dict[str, float] = {}
    job_mode = federation.job.dp_mode if federation.job is not None else ""
    refusal = evaluation_refusal(federation.policy, job_mode or "none")
    capped = federation.run_id is not None and federation.options.evaluate is not None \
        and federation.policy.evaluation == "clear" \
        and not federation.state.evaluated_for_job(federation.run_id, federation.policy.max_evaluations_per_job)
    if refusal is not None and federation.options.evaluate is not None:
        log.info("final evaluation refused: %s", refusal)
    elif capped:
        log.info("final evaluation refused: this site answered max_evaluations_per_job=%d evaluation "
                 "request(s) of this job", federation.policy.max_evaluations_per_job)
    elif federation.options.evaluate is not None and federation.policy.evaluation == "clear":
        try:
            federation.spec.load(model_vector(evaluate.model), federation.model)
            metrics = site_evaluation.run_evaluate(federation)
        except (MalformedMessage, ModelMismatchError) as err:
            log.error("final evaluation skipped: unusable model from the server (%s)", err)
    elif federation.options.evaluate is not None:
        log.info("per-site evaluation in the clear refused by this site's policy (evaluation=%s)",
                 federation.policy.evaluation)
    saved = federation._round_header
    federation._round_header = (int(evaluate.phase), bytes(evaluate.round_nonce))
    try:
        federation._report_metrics(int(evaluate.round), metrics)
    finally:
        federation._round_header = saved
