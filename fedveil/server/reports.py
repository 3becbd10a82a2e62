"""What a site reports (``ReportMetrics``): range checks, and the server's check of its privacy claim.

Nothing a client sends may raise INTERNAL. Three reports once did: a noise multiplier of ``inf``
(the accountant's event refused it after the report was half recorded), a tiny one (a
``ZeroDivisionError`` inside Opacus's RDP analysis), and ``num_examples >= 2**63`` (an SQLite
overflow raised after the report was marked received, so the site's correct retry was a "replay").
:func:`check_report` range-checks every number first and raises :class:`MalformedMessage` naming the
field and its allowed range; the coordinator stores a report before it marks it received.

A site's sample-level ε is its *claim*. The server knows the job's δ and (unless sites solve for a
target ε) its noise multiplier, the local epochs it asked for, the site's reported ``num_examples``
and the parameters of every round the site reported before. :func:`verify_spend` recomputes the
site's cumulative ε from those parameters with the RDP accountant (its cost does not depend on
``steps``) and checks the parameters against what the server knows; anything it cannot confirm makes
the spend *unverified*, with reasons, and views show no number for it as if it were a fact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedveil.dp.accounting import ACCOUNTANTS, DpEvent, RDPAccountant, SubsampledGaussianEvent
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage

MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_NUM_EXAMPLES = 10**12
"""Records one site may report (SQLite holds up to 2^63 - 1; no site has 10^12 records)."""
MAX_STEPS = 10**9
"""DP-SGD steps one site may report for one round."""
MIN_NOISE_MULTIPLIER = 1e-6
"""The smallest positive noise multiplier accepted (below it the RDP analysis divides by zero)."""
MAX_NOISE_MULTIPLIER = 1e6
MIN_SAMPLE_RATE = 1e-12
"""1 / MAX_NUM_EXAMPLES: a loader over n records has at most n batches, so q >= 1 / n."""
MAX_ACCOUNTANT_NAME = 32
PLAUSIBLE_MAX_NOISE_MULTIPLIER = 100.0
"""DP-SGD runs use noise multipliers of about 0.5 to 20; one above this is implausible, and the ε it
implies (about 0) is not shown as a fact unless the job itself prescribes it."""
EPSILON_REL_TOLERANCE = 1e-3
"""Agreement needed between a site's RDP claim and the server's RDP recomputation (same math)."""
NUMERIC_ACCOUNTANT_LOWER = 0.5
"""A PLD or PRV claim is tighter than RDP's; one below half the RDP bound is not believed."""
REPORTED = "reported by the site"


@dataclass(frozen=True)
class CheckedSpend:
    """A ``LocalPrivacySpend`` whose numbers are all within range (a site's claim, still)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str

    def event(self) -> SubsampledGaussianEvent | None:
        """The round's DP-SGD event, or ``None`` when there is nothing to account (no noise, no step)."""
        if self.noise_multiplier <= 0 or self.steps < 1:
            return None
        return SubsampledGaussianEvent(self.sample_rate, self.noise_multiplier, self.steps)


@dataclass(frozen=True)
class CheckedReport:
    num_examples: int
    metrics: dict[str, float]
    privacy: CheckedSpend | None


def _bounded(value: float, name: str, low: float, high: float, *, zero_ok: bool = False) -> float:
    v = float(value)
    if not (math.isfinite(v) and ((zero_ok and v == 0.0) or low <= v <= high)):
        allowed = f"[{low:g}, {high:g}]" + (" or 0" if zero_ok else "")
        raise MalformedMessage(f"{name}: {v!r} is outside the allowed range {allowed}")
    return v


def check_spend(spend: pb.LocalPrivacySpend) -> CheckedSpend:
    """Range-check a reported spend; :class:`MalformedMessage` names the field and the range."""
    eps = float(spend.epsilon)
    if math.isnan(eps) or eps < 0:  # +inf is what a site without noise reports
        raise MalformedMessage(f"privacy.epsilon: {eps!r} is outside the allowed range [0, inf]")
    delta = float(spend.delta)
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise MalformedMessage(f"privacy.delta: {delta!r} is outside the allowed range (0, 1)")
    z = _bounded(spend.noise_multiplier, "privacy.noise_multiplier", MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER,
                 zero_ok=True)
    q = _bounded(spend.sample_rate, "privacy.sample_rate", MIN_SAMPLE_RATE, 1.0)
    if not 0 <= spend.steps <= MAX_STEPS:
        raise MalformedMessage(f"privacy.steps: {spend.steps} is outside the allowed range [0, {MAX_STEPS}]")
    name = spend.accountant
    if len(name) > MAX_ACCOUNTANT_NAME or not name.isprintable():
        raise MalformedMessage(f"privacy.accountant: must be at most {MAX_ACCOUNTANT_NAME} printable characters")
    return CheckedSpend(eps, delta, z, q, int(spend.steps), name)


def check_report(request: pb.MetricsReport) -> CheckedReport:
    """Range-check a ``MetricsReport`` before anything of it is recorded."""
    if request.num_examples > MAX_NUM_EXAMPLES:
        raise MalformedMessage(
            f"num_examples: {request.num_examples} is outside the allowed range [0, {MAX_NUM_EXAMPLES}]"
        )
    if len(request.metrics) > MAX_METRICS:
        raise MalformedMessage(f"metrics: at most {MAX_METRICS} metrics (got {len(request.metrics)})")
    metrics: dict[str, float] = {}
    for i, m in enumerate(request.metrics):
        if not m.name or len(m.name) > MAX_METRIC_NAME:
            raise MalformedMessage(f"metrics[{i}].name: must be 1-{MAX_METRIC_NAME} characters")
        if not math.isfinite(m.value):
            raise MalformedMessage(f"metrics[{i}].value: {m.value!r} is not finite")
        metrics[m.name] = float(m.value)
    privacy = check_spend(request.privacy) if request.HasField("privacy") else None
    return CheckedReport(int(request.num_examples), metrics, privacy)


@dataclass(frozen=True)
class SpendContext:
    """What the server knows when a site reports its spend."""

    delta: float
    """The job's δ for sample-level accounting (sent to sites in ``LocalDpParams.delta``)."""
    noise_multiplier: float | None
    """The job's noise multiplier, or ``None`` when sites solve theirs for a target ε."""
    local_epochs: int
    """Local epochs per round the job asks for (``TrainingParams.local_epochs``)."""


@dataclass(frozen=True)
class SpendVerdict:
    verified: bool
    epsilon_recomputed: float | None
    """The site's cumulative ε recomputed by the server (RDP) from its reported parameters."""
    reasons: tuple[str, ...]


def verify_spend(
    spend: CheckedSpend, num_examples: int, earlier: Sequence[DpEvent], context: SpendContext,
    rdp: RDPAccountant | None = None,
) -> SpendVerdict:
    """Check a site's claim against what the server knows (see the module docstring).

    ``earlier``: the site's events already in the ledger (its earlier rounds); ``rdp``: an accountant
    whose RDP curve cache to share. Bounded time: one RDP composition over at most one event per round."""
    reasons: list[str] = []
    if not math.isclose(spend.delta, context.delta, rel_tol=1e-9):
        reasons.append(f"δ = {spend.delta:g} is not the job's δ = {context.delta:g}")
    z, q = spend.noise_multiplier, spend.sample_rate
    if z == 0:
        reasons.append("noise multiplier 0: no sample-level guarantee (ε = ∞)")
    elif context.noise_multiplier is not None:
        if not math.isclose(z, context.noise_multiplier, rel_tol=1e-9):
            reasons.append(f"noise multiplier {z:g} is not the job's {context.noise_multiplier:g}")
    elif z > PLAUSIBLE_MAX_NOISE_MULTIPLIER:
        reasons.append(f"noise multiplier {z:g} is far above what DP-SGD runs use (at most "
                       f"{PLAUSIBLE_MAX_NOISE_MULTIPLIER:g})")
    batches = math.ceil(1.0 / q)
    if spend.steps > context.local_epochs * batches:
        reasons.append(f"{spend.steps} steps exceed what {context.local_epochs} local epoch(s) of "
                       f"⌈1/q⌉ = {batches} batches allow")
    if num_examples <= 0:
        reasons.append("num_examples was not reported, so the sample rate cannot be checked")
    elif q * num_examples < 1.0 - 1e-9:
        reasons.append(f"sample rate {q:g} means {batches} batches per epoch, more than the "
                       f"{num_examples} records reported")
    recomputed = _recompute(earlier, spend.event(), context.delta, rdp or RDPAccountant())
    if spend.accountant not in ACCOUNTANTS:
        reasons.append(f"accountant {spend.accountant!r} is unknown to the server")
    elif not _agrees(spend.epsilon, recomputed, spend.accountant):
        reasons.append(f"the site reports ε = {spend.epsilon:.6g}; the server recomputes ε = {recomputed:.6g} "
                       "(RDP) from the parameters it reported")
    return SpendVerdict(not reasons, recomputed if math.isfinite(recomputed) else None, tuple(reasons))


def _recompute(earlier: Sequence[DpEvent], event: DpEvent | None, delta: float, rdp: RDPAccountant) -> float:
    acc = rdp.fresh()
    for e in [*earlier, *([event] if event is not None else [])]:
        acc.compose(e)
    if not acc.history:
        return 0.0
    return acc.get_epsilon(delta)


def _agrees(claim: float, recomputed: float, accountant: str) -> bool:
    if math.isinf(recomputed) or math.isinf(claim):
        return claim == recomputed
    slack = EPSILON_REL_TOLERANCE * recomputed + 1e-9
    if accountant == "rdp":
        return abs(claim - recomputed) <= slack
    return NUMERIC_ACCOUNTANT_LOWER * recomputed - slack <= claim <= recomputed + slack


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def spend_record(spend: CheckedSpend, num_examples: int, verdict: SpendVerdict, in_ledger: bool) -> dict[str, Any]:
    """The stored row: every number the site sent labelled as *reported*, next to the server's verdict."""
    return {
        "source": REPORTED,
        "epsilon_reported": _finite(spend.epsilon),
        "epsilon_reported_infinite": math.isinf(spend.epsilon),
        "delta_reported": spend.delta,
        "noise_multiplier_reported": spend.noise_multiplier,
        "sample_rate_reported": spend.sample_rate,
        "steps_reported": spend.steps,
        "accountant_reported": spend.accountant,
        "num_examples_reported": num_examples,
        "epsilon_recomputed": verdict.epsilon_recomputed,
        "verified": verdict.verified,
        "unverified": list(verdict.reasons),
        "in_ledger": in_ledger,
    }


def ledger_details(verdict: SpendVerdict) -> dict[str, Any]:
    """What goes with the site's event in the ledger: its source, and the server's verdict."""
    details: dict[str, Any] = {"source": REPORTED, "verified": verdict.verified}
    if not verdict.verified:
        details["unverified"] = "; ".join(verdict.reasons)
    return details
