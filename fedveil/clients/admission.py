"""Whether this site takes part in a round: every server-chosen parameter checked against its policy.

:func:`admit_round` runs on a ``RoundStart`` before the site sends anything for the round. It
raises :class:`~fedveil.clients.policy.PolicyViolation` naming the field at fault when the round
contradicts the job the site joined, breaks its policy, or would let a deviating server learn
more than the sum over enough honest sites:

- the cohort's identities must be vouched for by the consortium authority the site pinned (an
  invented cohort member has no credential), one slot per site, this site in its own slot; a
  refusal names the members at fault (:class:`CohortRefused`), and so does the site's decline;
- n must reach the site's minimum cohort and t must satisfy 2t > h + c for the colluders c the
  site assumes among a client's h share holders (:mod:`fedveil.secagg.threshold`);
- DP mode and noise must meet the site's floor; with distributed DP the site computes the noise
  share it adds itself (:func:`fedveil.clients.mechanisms.own_noise_stddev`), whatever the server asks;
- retries of a round whose unmasking shares the site released, and attempts beyond its cap, are
  refused (:class:`fedveil.clients.site_state.SiteState`), and so is a model the site already
  released a sum over, unless noise it relies on protects the release.

What it returns (:class:`Admission`) is what the site needs to take part: the user-level DP event
it can rely on for each release, its own noise share, and whether it evaluates.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import numpy as np

from fedveil.clients.mechanisms import CLIENT_MECHANISMS, ClientMechanism, MechanismTerms, client_mechanism
from fedveil.clients.policy import PolicyViolation, SitePolicy, UserBudgetExceeded, check_training
from fedveil.clients.site_state import SiteState
from fedveil.clients.update import AttemptRandomness, PreparedUpdate
from fedveil.dp.accounting import DpEvent
from fedveil.dp.ledger import BUDGET_REL_TOLERANCE
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.binding import binding_problem
from fedveil.secagg.errors import SecAggError
from fedveil.secagg.identity import SiteCredential, decode_credential, verify_revocations, verify_roster
from fedveil.secagg.threshold import cohort_bound, cohort_problem, threshold_problem

SPARSE_MIN_CORRUPT_FRACTION = 1 / 3
"""The smallest colluding fraction a site assumes in a SecAgg+ (sparse Harary) round it joins."""


@dataclass(frozen=True)
class Admission:
    """The checked round, as this site will take part in it."""

    holders: int
    corrupt: int
    """c: colluders the site assumes among a client's holders."""
    honest_contributors: int
    """Fewest honest inputs (this site's included) any released sum can hold: t − c."""
    mechanism: ClientMechanism
    """The round's privacy mechanism, as this site takes part in it."""
    terms: MechanismTerms
    """What the site relies on under it: its guaranteed noise, its own noise share."""
    evaluate: bool = False
    """Fill the round's evaluation section with this site's sums (a round with a section it would not
    fill is declined: zeros would leave the others' sums alone)."""
    evaluation_allowed: bool = True
    """Whether this site evaluates on its data in this job at all (secure or clear): not under local DP
    unless its policy opts in (:func:`evaluation_refusal`)."""
    model_digest: bytes = b""
    """The global model as the site names it (:func:`fedveil.protocol.codec.model_digest`): recorded
    when the site releases a sum over it, and never released over again without noise it relies on."""

    @property
    def guaranteed_event(self) -> DpEvent | None:
        """The user-level noise the site can rely on per release (None: none it can check)."""
        return self.terms.guaranteed_event

    def encode(self, delta: np.ndarray, start: pb.RoundStart, randomness: AttemptRandomness,
               weight: float) -> PreparedUpdate:
        """``delta`` clipped and encoded into the round's ring under its mechanism."""
        return self.mechanism.encode(delta, start, self.terms, randomness, weight)


def check_job_consistency(start: pb.RoundStart, job: pb.JobInfo, run_id: str, model_digest: bytes) -> None:
    """The round must belong to the job this site joined, keep its announced settings, and bind its terms
    (``model_digest``: the site's own name for the model it loaded) into its secure-aggregation session."""
    if start.run_id != run_id:
        raise PolicyViolation("run_id", f"the round is for run {start.run_id!r}; this site joined {run_id!r}")
    if (start.dp.mode or "none") != (job.dp_mode or "none"):
        raise PolicyViolation("dp.mode", f"the round asks for DP mode {start.dp.mode!r}; the job was announced "
                              f"with {job.dp_mode!r}")
    if bool(start.secagg.active_adversary) != bool(job.active_adversary):
        raise PolicyViolation("secagg.active_adversary", "the round's adversary mode differs from the job's "
                              f"(job: {'active' if job.active_adversary else 'passive'})")
    problem = binding_problem(start, model_digest)
    if problem is not None:
        raise PolicyViolation("secagg.context", problem)
    round_graph, job_graph = start.secagg.graph or "complete", job.secagg_graph or "complete"
    # A Harary job falls back to the complete graph for cohorts too small for a sparse one: every pair
    # then masks and the threshold is checked over the whole cohort, so that is never weaker.
    if round_graph != job_graph and not (job_graph == "harary" and round_graph == "complete"):
        raise PolicyViolation("secagg.graph", f"the round uses graph {start.secagg.graph!r}; the job was announced "
                              f"with {job.secagg_graph!r}")


class CohortRefused(PolicyViolation):
    """The cohort's credentials or identity keys fail this site's checks. ``members`` are the slots
    at fault other than this site's own (empty when the site cannot tell, e.g. its own revocation
    list does not verify): its decline names them (``RoundResponse.refused_members``), so that the
    server can leave out a member that enough sites refuse (:mod:`fedveil.server.coordinator.refusal_tally`)."""

    def __init__(self, field_name: str, message: str, members: tuple[int, ...]) -> None:
        super().__init__(field_name, message)
        self.members = members


class ModelReplayRefused(PolicyViolation):
    """The round's global model is one this site already released a sum over, with no noise it relies on
    covering a second release: its decline says so (``RoundResponse.released_over_model``), so an honest
    server leaves it out of cohorts until the model changes instead of drawing it again."""


@dataclass(frozen=True)
class CheckedCohort:
    """A cohort roster that passed :func:`verify_roster` and the key-per-slot check under one
    site policy's trust anchors: who holds each slot, and when that verdict holds."""

    slots: tuple[tuple[str, bytes], ...]
    """(site name, identity key) per cohort slot, from the credentials."""
    valid_from: int
    """The latest ``not_before`` among them."""
    valid_until: int
    """The earliest ``not_after`` among them (exclusive)."""


class _CohortChecks:
    """The cohorts this process already checked, keyed on the exact ``SecAggParams`` bytes and the
    policy's authority key, consortium and revocation list.

    Each site of a round gets the same n credentials; the hundreds of sites a simulation worker
    hosts each decoded, re-encoded and looked up all n of them at the same moment, which at
    n = 600 was about a kilobyte per cohort member per site of the worker's peak memory. The check
    is a pure function of those bytes, those anchors and the time, so a site whose round carries
    exactly the checked bytes under exactly the same anchors reuses the verdict within its
    validity window. Anything else (another byte, another authority) is checked in full.
    """

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: dict[tuple[object, ...], CheckedCohort] = {}

    def get(self, key: tuple[object, ...], now: int) -> CheckedCohort | None:
        with self._lock:
            hit = self._entries.get(key)
        return hit if hit is not None and hit.valid_from <= now < hit.valid_until else None

    def put(self, key: tuple[object, ...], checked: CheckedCohort) -> None:
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = checked


_COHORT_CHECKS = _CohortChecks()


def check_identities(policy: SitePolicy, start: pb.RoundStart, *, own_name: str, own_key: bytes, now: int,
                     verified: set[bytes] | None = None) -> None:
    """Active mode: one authority-vouched credential per cohort slot, matching its identity key."""
    key = (hashlib.sha256(start.secagg.SerializeToString()).digest(), policy.authority_public_key,
           policy.consortium, policy.revocations)
    checked = _COHORT_CHECKS.get(key, now)
    if checked is None:
        try:
            checked = _check_cohort(policy, start, now=now, verified=verified)
        except PolicyViolation as err:
            raise CohortRefused(err.field, err.detail,
                                _refused_members(policy, start, now=now, verified=verified)) from None
        _COHORT_CHECKS.put(key, checked)
    name, identity = checked.slots[int(start.client_id)]
    if name != own_name or identity != own_key:
        raise PolicyViolation("client_id", f"slot {start.client_id} is not this site's credential "
                              f"(it names {name!r})")


def _check_cohort(policy: SitePolicy, start: pb.RoundStart, *, now: int, verified: set[bytes] | None) -> CheckedCohort:
    params = start.secagg
    n = int(params.cohort_size)
    keys = [bytes(k) for k in params.identity_keys]
    raw = [bytes(c) for c in params.identity_credentials]
    if len(keys) != n or len(raw) != n:
        raise PolicyViolation("secagg.identity_credentials", f"expected one identity key and one credential per "
                              f"cohort member (n={n}; got {len(keys)} keys, {len(raw)} credentials)")
    assert policy.authority_public_key is not None
    try:
        credentials = [decode_credential(c) for c in raw]
        consortium = policy.consortium or (credentials[0].consortium if credentials else "")
        verify_roster(policy.authority_public_key, credentials, consortium=consortium, now=now,
                      revocations=policy.revocations, verified=verified)
    except SecAggError as err:
        raise PolicyViolation("secagg.identity_credentials", f"the cohort is not vouched for by this site's "
                              f"authority: {err}") from None
    for i, (cred, key) in enumerate(zip(credentials, keys, strict=True)):
        if cred.identity_public_key != key:
            raise PolicyViolation(f"secagg.identity_keys[{i}]", f"the key of cohort member {i} is not the one its "
                                  f"credential ({cred.site_name!r}) vouches for")
    return CheckedCohort(tuple((c.site_name, c.identity_public_key) for c in credentials),
                         max((c.not_before for c in credentials), default=now),
                         min((c.not_after for c in credentials), default=now + 1))


def _refused_members(policy: SitePolicy, start: pb.RoundStart, *, now: int,
                     verified: set[bytes] | None) -> tuple[int, ...]:
    """The slots of a refused cohort whose credential or identity key fails on its own, as
    :func:`_check_cohort` checks them, other than this site's: what its decline names."""
    params = start.secagg
    n = int(params.cohort_size)
    keys = [bytes(k) for k in params.identity_keys]
    raw = [bytes(c) for c in params.identity_credentials]
    if len(keys) != n or len(raw) != n:
        return ()  # the roster's shape is the server's doing, not a member's
    assert policy.authority_public_key is not None
    revocations = policy.revocations
    credentials: list[SiteCredential | None] = []
    for data in raw:
        try:
            credentials.append(decode_credential(data))
        except SecAggError:
            credentials.append(None)
    consortium = policy.consortium or (credentials[0].consortium if credentials and credentials[0] else "")
    try:
        if revocations is not None:  # this site's own list: if it does not verify, blame no member
            verify_revocations(policy.authority_public_key, revocations, consortium=consortium)
    except SecAggError:
        return ()
    bad: set[int] = set()
    names: dict[str, list[int]] = {}
    holders: dict[bytes, list[int]] = {}
    for i, (cred, key) in enumerate(zip(credentials, keys, strict=True)):
        if cred is None:
            bad.add(i)
            continue
        try:
            verify_roster(policy.authority_public_key, [cred], consortium=consortium, now=now, revocations=None,
                          verified=verified)
        except SecAggError:
            bad.add(i)
        if (revocations is not None and cred.serial in revocations.revoked) or cred.identity_public_key != key:
            bad.add(i)
        names.setdefault(cred.site_name, []).append(i)
        holders.setdefault(cred.identity_public_key, []).append(i)
    for slots in (*names.values(), *holders.values()):  # one site or key in two slots: both are suspect
        if len(slots) > 1:
            bad.update(slots)
    bad.discard(int(start.client_id))
    return tuple(sorted(bad))


def check_threshold(policy: SitePolicy, start: pb.RoundStart) -> tuple[int, int]:
    """t must satisfy 2t > h + c (t > c with a trusted server) for this site's own f; returns (h, c)."""
    n = int(start.secagg.cohort_size)
    k = int(start.secagg.degree) if start.secagg.graph == "harary" else 0
    cohort = cohort_problem(n, k, start.secagg.graph or "complete")
    if cohort is not None:  # before cohort_bound, whose work grows with n and k
        parameter, reason = cohort
        raise PolicyViolation("secagg.cohort_size" if parameter == "num_clients" else "secagg.degree", reason)
    server_f = float(start.secagg.max_corrupt_fraction)
    if not policy.trust_server and server_f + 1e-12 < policy.max_corrupt_fraction:
        raise PolicyViolation("secagg.max_corrupt_fraction", f"the round assumes a colluding fraction of {server_f:g}; "
                              f"this site assumes {policy.max_corrupt_fraction:g}")
    if not policy.trust_server and 0 < k < n - 1 and policy.max_corrupt_fraction < SPARSE_MIN_CORRUPT_FRACTION:
        # an independent attacker split the views of a victim's neighbours on SecAgg+ graphs with f = 0
        # and f = 0.1 (threat model: "Split views on SecAgg+ graphs"); it failed at f = 1/3
        raise PolicyViolation("max_corrupt_fraction",
                              f"this site assumes f={policy.max_corrupt_fraction:g}, below "
                              f"{SPARSE_MIN_CORRUPT_FRACTION:.4g}: on a SecAgg+ (Harary) graph a malicious server "
                              "can split the views of its neighbours at such thresholds; assume f >= 1/3 or take "
                              "part only in complete-graph rounds")
    h, c = cohort_bound(n, k, policy.max_corrupt_fraction, security_bits=policy.security_bits)
    problem = threshold_problem(int(start.secagg.threshold), h, c, active=not policy.trust_server)
    if problem is not None:
        raise PolicyViolation("secagg.threshold", f"{problem} (this site assumes f={policy.max_corrupt_fraction:.3g})")
    return h, c


def admit_round(policy: SitePolicy, job: pb.JobInfo, start: pb.RoundStart, *, run_id: str, own_name: str,
                own_key: bytes, now: int, state: SiteState, model_digest: bytes,
                verified: set[bytes] | None = None, has_evaluator: bool = True) -> Admission:
    """Check ``start`` before taking part (see the module docstring); raises :class:`PolicyViolation`.

    ``model_digest`` is the site's own digest of the round's model (never the server's field);
    ``has_evaluator``: the site has an evaluation function to fill secure evaluation sums with."""
    check_job_consistency(start, job, run_id, model_digest)
    refusal = state.admission_refusal(run_id, int(start.round), policy.max_attempts_per_round,
                                      evaluation_only=start.purpose == pb.ROUND_PURPOSE_EVALUATE,
                                      max_evaluations_per_job=policy.max_evaluations_per_job)
    if refusal is not None:
        raise PolicyViolation("round", refusal)
    mode = start.dp.mode or "none"
    if mode not in policy.allowed_dp_modes:
        raise PolicyViolation("dp.mode", f"DP mode {mode!r} is not allowed by this site's policy "
                              f"(allowed: {', '.join(sorted(policy.allowed_dp_modes))})")
    check_training(policy, start)  # epochs and local-DP parameters, before the site accepts (again at training)
    n = int(start.secagg.cohort_size)
    if n < policy.min_cohort:
        raise PolicyViolation("secagg.cohort_size", f"a cohort of {n} is below this site's minimum of "
                              f"{policy.min_cohort}")
    if not 0 <= int(start.client_id) < n:
        raise PolicyViolation("client_id", f"{start.client_id} is outside the cohort 0..{n - 1}")
    if not policy.trust_server:
        if not start.secagg.active_adversary:
            raise PolicyViolation("secagg.active_adversary", "passive secure aggregation; this site does not "
                                  "trust the server")
        check_identities(policy, start, own_name=own_name, own_key=own_key, now=now, verified=verified)
    h, c = check_threshold(policy, start)
    honest = max(1, int(start.secagg.threshold) - c)
    mechanism = client_mechanism(mode)
    evaluation = start.encoding.evaluation
    if mechanism.user_level and (evaluation.dimension or start.purpose == pb.ROUND_PURPOSE_EVALUATE):
        raise PolicyViolation("encoding.evaluation", "evaluation sums would be released without the round's "
                              "user-level noise")
    refusal = evaluation_refusal(policy, mode)
    if refusal is not None and start.purpose == pb.ROUND_PURPOSE_EVALUATE:
        raise PolicyViolation("purpose", f"an evaluation-only round: {refusal}")
    evaluate = bool(evaluation.dimension) and policy.evaluation == "secure" and refusal is None
    if evaluation.dimension and not (evaluate and has_evaluator):
        # Zeros would leave the other sites' sums alone in the "secure" total: a server that draws a
        # cohort in which only the victim evaluates gets its metrics alone (review of 2026-12-07). An
        # honest server asks only cohorts of sites that evaluate (JoinRequest.evaluates).
        why = ("it has no evaluation function" if not has_evaluator
               else refusal or f"its policy's evaluation is {policy.evaluation!r}")
        raise PolicyViolation("encoding.evaluation", f"the round asks for secure evaluation sums and this site does "
                              f"not evaluate ({why}); adding zeros instead would leave the other sites' sums alone "
                              "in the secure total")
    terms = mechanism.terms(policy, start, honest)
    over_budget = user_budget_refusal(policy, state, mode, terms.guaranteed_event)
    if over_budget is not None:
        raise UserBudgetExceeded(*over_budget)
    # Evaluation sums carry no noise under any mechanism: a replayed model gives the same metrics
    # (local DP's fresh DP-SGD noise covers the update only; the second review of 2026-12-07)
    if (not mechanism.protects_replays(terms) or evaluate) and state.released_over(model_digest):
        # No noise this site relies on: the same model again gives the same update and metrics, and
        # two sums over cohorts with and without this site would difference to them exactly, in
        # this run or another. (With local DP every training draws fresh DP-SGD noise, and
        # user-level noise is accounted per release.)
        unprotected = ("its evaluation sums, which carry no noise" if mechanism.protects_replays(terms)
                       else "no noise it relies on")
        # only a site that would decline any round over it says so (evaluation sums alone: a training round is fine)
        refused = ModelReplayRefused if not mechanism.protects_replays(terms) else PolicyViolation
        raise refused("model", f"the global model (sha256 {model_digest.hex()[:16]}…) is one this site "
                              f"already released a sum over, in this run or an earlier one, with {unprotected}; a "
                              "server that replays a model could difference the two sums (a new run needs a new "
                              "initial model)")
    return Admission(holders=h, corrupt=c, honest_contributors=honest, mechanism=mechanism, terms=terms,
                     evaluate=evaluate, evaluation_allowed=refusal is None, model_digest=model_digest)


def user_budget_refusal(policy: SitePolicy, state: SiteState, mode: str,
                        event: DpEvent | None) -> tuple[str, str] | None:
    """(field, reason) when this release would take the site's user-level ε past its policy's
    ``max_user_epsilon`` (None: within it, or no cap).

    ``min_noise_multiplier`` bounds the noise of one release; the number of releases is the server's
    to announce (a job's round count, then job after job). The site composes the release it is asked
    for with every one its ledger records, from the noise it can rely on only, before it trains, so a
    declined round costs it nothing. A release without noise the site can rely on has no bound."""
    cap = policy.max_user_epsilon
    if not cap:
        return None
    after = state.user_epsilon_after(event)
    if math.isinf(after):
        what = ("an earlier release had none" if event is not None
                else f"dp.mode {mode!r} gives none this site can rely on")
        return ("dp.mode", f"this release would have no user-level noise bound ({what}), so its user-level ε "
                           f"would be unbounded, past this site's max_user_epsilon={cap:g}")
    if after > cap * (1.0 + BUDGET_REL_TOLERANCE):
        return ("round", f"this release would take this site's user-level ε to {after:.4g} (δ = "
                         f"{state.ledger.config.federation_delta:g}, over {len(state.releases)} earlier release(s)), "
                         f"past its max_user_epsilon={cap:g}")
    return None


def evaluation_refusal(policy: SitePolicy, dp_mode: str) -> str | None:
    """Why this site does not evaluate on its data in a job with ``dp_mode`` (None: it may).

    Local DP-SGD accounts for training only: each evaluation of a model the server chose is an
    un-noised query on the site's records (with a crafted model and a replayed round, an exact
    count), so the ε the site reports would not hold. Under local DP a site therefore evaluates
    only when its policy opts in (``evaluate_under_local_dp``), knowing its ε does not cover it.
    Under user-level DP (central, distributed) it never does: an honest server turns evaluation off."""
    if dp_mode == "local" and not policy.evaluate_under_local_dp:
        return ("local DP-SGD's ε does not cover evaluation on this site's records, and this site's policy does not "
                "opt in to evaluating anyway (evaluate_under_local_dp)")
    mechanism = CLIENT_MECHANISMS.get(dp_mode or "none")
    if mechanism is not None and mechanism.user_level:
        # Sums over the round's user-level noise are refused at admission; clear per-site metrics would
        # leave with no noise and no entry in the ledger (review of 2026-12-07)
        return f"user-level DP ({dp_mode}) does not cover metrics of this site's records, which would leave un-noised"
    return None
