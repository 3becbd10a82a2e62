"""A malicious server's numbers against the unmodified site: each is refused, naming the field.

A server chooses every number a site computes with. Before these checks some of them crashed the
site or made it allocate or compute without bound (review findings 5, 7 and 8):

- 5: numbers in ``dp.distributed.config_json`` (``"dim": 10**400``, 10^5 nested brackets,
  ``"n_clients": 10**400``) raised OverflowError or RecursionError out of admission, and encoding
  numbers the site read only after training (``max_weight = 1.7e308``, a dimension one off, an
  evaluation clip of 0) raised out of the user's loop instead of a decline. Now every number the
  site encodes with is checked at admission (:meth:`ClientMechanism.terms`), before it trains, and
  a bad one is a decline (``PolicyViolation``) naming the field;
- 7: ``Model.size_bytes`` over gRPC, in ``tests/test_attack_model_size.py``;
- 8: with a trusted server, the collusion bound's CPU grew with the server's ``cohort_size`` and
  ``degree`` (25 minutes at a uint32 n); now n is bounded by :data:`MAX_COHORT` and a Harary degree
  by n before the bound runs.

Fast tests call the real site code on RoundStarts the real server planned
(:class:`fedveil.server.training.GlobalModel`), then tampered; the slow ones run a real job behind
:class:`~tests.attack_helpers.TamperingServer` (finding 5).
The dropped ids of an unmasking request (finding 6) are in ``tests/test_secagg_dropped_ids.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fedveil.clients.mechanisms import client_mechanism
from fedveil.clients.participation import evaluation_section
from fedveil.clients.policy import PolicyViolation, SitePolicy
from fedveil.clients.update import attempt_randomness
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_message
from fedveil.secagg.config import MAX_CLIENTS
from fedveil.secagg.errors import ConfigError
from fedveil.secagg.threshold import MAX_COHORT, cohort_bound, cohort_problem, collusion_bound, plan_threshold
from fedveil.server.coordinator import Coordinator
from fedveil.server.training import GlobalModel
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, Consortium, TamperingServer, job_config, run_job, turnkey

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
DIM = 11
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
TRUSTING = SitePolicy(trust_server=True)
DP_OPTIONS: dict[str, dict[str, Any]] = {"none": {}, "local": {"dp_noise_multiplier": 1.0},
                                         "central": {"dp_noise_multiplier": 1.0},
                                         "distributed": {"dp_noise_multiplier": 1.0}}


def planned_start(mode: str = "none", *, metrics: tuple[str, ...] = (), evaluation_only: bool = False,
                  n: int = 4, **config: Any) -> pb.RoundStart:
    """The RoundStart the real server plans for a round of ``n`` sites over a model of DIM values."""
    params = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
    server = GlobalModel(job_config(dp=mode, **{**DP_OPTIONS[mode], **config}), params, seed=3)
    plan = server.plan(1, n, 3, b"run", evaluation_only=evaluation_only, metrics=metrics)
    return pb.RoundStart(round=1, model=model_message(params, 0), encoding=plan.encoding, dp=plan.dp,
                         purpose=pb.ROUND_PURPOSE_EVALUATE if evaluation_only else pb.ROUND_PURPOSE_TRAIN,
                         secagg=pb.SecAggParams(cohort_size=n, threshold=3, graph="complete"))


def declined_naming_or_encoded(start: pb.RoundStart, fields: tuple[str, ...]) -> None:
    """The property's one outcome: admitted and encoded, or declined naming a field that starts with
    one of ``fields`` (anything else raised fails the test)."""
    try:
        admitted_then_encoded(start)
        event("admitted and encoded")
    except PolicyViolation as err:
        assert err.field.startswith(fields), err
        event(f"declined: {err.field}")


def admitted_then_encoded(start: pb.RoundStart) -> np.ndarray:
    """What an admitted site does with ``start``: its terms (at admission), then, once trained, its
    update and evaluation section encoded as the round asks (session.Federation._finish_round)."""
    mechanism = client_mechanism(start.dp.mode)
    terms = mechanism.terms(TRUSTING, start, 2)
    randomness = attempt_randomness(b"s" * 32, 1, 1, deterministic=True)
    weight = float(min(max(100.0, 1.0), start.encoding.max_weight)) if start.encoding.weighted else 0.0
    parts = []
    if start.purpose != pb.ROUND_PURPOSE_EVALUATE:
        delta = np.linspace(-0.5, 0.5, DIM)
        parts.append(mechanism.encode(delta, start, terms, randomness, weight).ring_vector)
    dtype = parts[0].dtype if parts else np.dtype(np.uint32 if start.encoding.ring_bits <= 32 else np.uint64)
    parts.append(evaluation_section(start, {"loss": 0.5, "accuracy": 0.9}, 10.0, dtype))
    ring = np.concatenate([p.astype(dtype, copy=False) for p in parts])
    assert ring.shape == (start.encoding.dimension,)
    return ring


def refused(start: pb.RoundStart) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as err:
        client_mechanism(start.dp.mode).terms(TRUSTING, start, 2)
    return err.value


# -- 5. the honest plans are admitted and encode --------------------------------------------------

@pytest.mark.parametrize(("mode", "metrics", "evaluation_only", "config"), [
    ("none", (), False, {}),
    ("none", ("loss", "accuracy"), False, {}),
    ("none", ("loss",), True, {}),
    ("none", (), False, {"weighted": False}),
    ("local", ("loss",), False, {}),
    ("central", (), False, {}),
    ("central", (), False, {"dp_adaptive_clipping": True, "dp_noise_multiplier": 0.3}),
    ("distributed", (), False, {}),
])
def test_what_an_honest_server_plans_is_admitted_and_encodes(mode: str, metrics: tuple[str, ...],
                                                              evaluation_only: bool, config: dict[str, Any]) -> None:
    admitted_then_encoded(planned_start(mode, metrics=metrics, evaluation_only=evaluation_only, **config))


# -- 5a. dp.distributed.config_json at admission ---------------------------------------------------

def _config_json(start: pb.RoundStart, **changes: Any) -> pb.RoundStart:
    fields = json.loads(start.dp.distributed.config_json)
    fields.update(changes)
    start.dp.distributed.config_json = json.dumps(fields)
    return start


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: _config_json(s, dim=10**400), "dp.distributed.config_json.dim"),  # was OverflowError
    (lambda s: _config_json(s, n_clients=10**400), "dp.distributed.config_json.n_clients"),  # was OverflowError
    (lambda s: _config_json(s, n_clients=MAX_COHORT + 1), "dp.distributed.config_json.n_clients"),
    (lambda s: _config_json(s, dim=DIM + 1), "dp.distributed.config_json.dim"),  # was a crash after training
    (lambda s: _config_json(s, clip_norm=10**400), "dp.distributed.config_json.clip_norm"),
    (lambda s: _config_json(s, scale=1e308), "dp.distributed.config_json"),
    (lambda s: _config_json(s, bits=json.loads(s.dp.distributed.config_json)["bits"] + 1),
     "encoding.ring_bits"),  # more bits than the round's ring holds
    (lambda s: setattr(s.dp.distributed, "config_json", "[" * 100_000 + "]" * 100_000),  # was RecursionError
     "dp.distributed.config_json"),
    (lambda s: setattr(s.dp.distributed, "config_json", "[" * 2000 + "]" * 2000), "dp.distributed.config_json"),
    (lambda s: setattr(s.dp.distributed, "config_json", "[1]"), "dp.distributed.config_json"),
    (lambda s: setattr(s.dp.distributed, "rotation_seed", b"1234"), "dp.distributed.rotation_seed"),
    (lambda s: setattr(s.encoding, "dimension", s.encoding.dimension * 2), "encoding.dimension"),
])
def test_a_distributed_dp_number_the_site_cannot_use_is_declined_at_admission(
        change: Callable[[pb.RoundStart], Any], field: str) -> None:
    start = planned_start("distributed", n=4)
    change(start)
    assert refused(start).field == field


_EXTREME_NUMBERS = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400), st.sampled_from([0, 1, 2, DIM, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 1e-308, 0.5]),
    st.integers(1, 64), st.floats(0.01, 1e4),
)
_KEPT = st.none()
"""The honest planned value, left as it was."""


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(["mechanism", "n_clients", "dim", "clip_norm", "bits", "scale",
                                                "local_stddev", "beta", "k_stddevs"]),
                               st.one_of(_EXTREME_NUMBERS, st.sampled_from(["skellam", "ddg", "", None])),
                               min_size=1, max_size=3))
def test_any_distributed_config_is_declined_naming_a_field_or_encodes(changes: dict[str, Any]) -> None:
    """Whatever numbers the server writes into the configuration, the site either declines at
    admission naming a field, or can encode its update as the round asks: nothing else escapes."""
    start = planned_start("distributed")
    fields = json.loads(start.dp.distributed.config_json)
    fields.update(changes)
    start.dp.distributed.config_json = json.dumps(fields, allow_nan=True)
    declined_naming_or_encoded(start, ("dp.distributed", "encoding."))


# -- 5b. encoding numbers read after training, now checked before it -------------------------------

def _evaluation(start: pb.RoundStart, **changes: Any) -> pb.RoundStart:
    for key, value in changes.items():
        setattr(start.encoding.evaluation, key, value)
    return start


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: setattr(s.encoding, "max_weight", 1.7e308), "encoding.max_weight"),  # was OverflowError
    (lambda s: setattr(s.encoding, "max_weight", math.inf), "encoding.max_weight"),
    (lambda s: setattr(s.encoding, "max_weight", math.nan), "encoding.max_weight"),
    (lambda s: setattr(s.encoding, "clip_range", math.inf), "encoding.clip_range"),
    (lambda s: setattr(s.encoding, "clip_range", 0.0), "encoding.clip_range"),
    (lambda s: setattr(s.encoding, "fractional_bits", 60), "encoding"),
    (lambda s: setattr(s.encoding, "ring_bits", 65), "encoding.ring_bits"),
    (lambda s: setattr(s.encoding, "dimension", s.encoding.dimension + 1), "encoding.dimension"),  # RoundConfigError
    (lambda s: setattr(s.encoding, "dimension", 0), "encoding.dimension"),
    (lambda s: s.encoding.extra_coordinates.append("secret"), "encoding.extra_coordinates"),
    (lambda s: s.encoding.extra_coordinates.append("unclipped"), "encoding.dimension"),
    (lambda s: setattr(s.dp, "update_clip_norm", math.inf), "dp.update_clip_norm"),
    (lambda s: setattr(s.dp, "update_clip_norm", math.nan), "dp.update_clip_norm"),
    (lambda s: _evaluation(s, clip=0.0), "encoding.evaluation"),  # was EvaluationLayoutError
    (lambda s: _evaluation(s, max_examples=0), "encoding.evaluation"),
    (lambda s: _evaluation(s, limbs=1000), "encoding.evaluation"),
    (lambda s: _evaluation(s, dimension=s.encoding.evaluation.dimension + 2), "encoding.evaluation.dimension"),
])
def test_an_encoding_number_the_site_cannot_use_is_declined_before_training(
        change: Callable[[pb.RoundStart], Any], field: str) -> None:
    start = planned_start("none", metrics=("loss",))
    change(start)
    assert refused(start).field == field


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_a_central_noise_multiplier_that_is_no_number_is_declined(value: float) -> None:
    """A NaN passed the site's floor comparison (``z < floor`` is False for NaN)."""
    start = planned_start("central")
    start.dp.noise_multiplier = value
    assert refused(start).field == "dp.noise_multiplier"


@settings(max_examples=200, deadline=None)
@given(max_weight=_KEPT | _EXTREME_NUMBERS, clip_range=_KEPT | _EXTREME_NUMBERS, clip_norm=_KEPT | _EXTREME_NUMBERS,
       evaluation_clip=_KEPT | _EXTREME_NUMBERS, fractional_bits=_KEPT | st.integers(0, 80),
       ring_bits=_KEPT | st.integers(0, 80), dimension=st.sampled_from([0, 0, -1, 1, 2]),
       weighted=_KEPT | st.booleans())
def test_any_fixed_point_encoding_is_declined_naming_a_field_or_encodes(
        max_weight: Any, clip_range: Any, clip_norm: Any, evaluation_clip: Any, fractional_bits: int | None,
        ring_bits: int | None, dimension: int, weighted: bool | None) -> None:
    """Whatever numbers the server puts in a fixed-point round's encoding, the site either declines at
    admission naming a field, or encodes its update and evaluation section to ``encoding.dimension``."""
    start = planned_start("none", metrics=("loss",))
    enc = start.encoding
    for target, key, value in ((enc, "max_weight", max_weight), (enc, "clip_range", clip_range),
                               (start.dp, "update_clip_norm", clip_norm), (enc.evaluation, "clip", evaluation_clip),
                               (enc, "fractional_bits", fractional_bits), (enc, "ring_bits", ring_bits),
                               (enc, "weighted", weighted)):
        if value is None:
            continue
        if key in ("fractional_bits", "ring_bits", "weighted"):
            setattr(target, key, value)
            continue
        try:
            setattr(target, key, float(value))
        except OverflowError:  # a double field cannot hold the number at all
            setattr(target, key, math.inf if value > 0 else -math.inf)
    enc.dimension = max(0, enc.dimension + dimension)
    declined_naming_or_encoded(start, ("encoding", "dp.update_clip_norm"))


# -- 5. a real job behind a tampering server: a decline, no crash, no data --------------------------

def _tampered_config(change: Callable[[dict[str, Any]], None] | str) -> Callable[[pb.RoundStart], None]:
    def tamper(start: pb.RoundStart) -> None:
        if isinstance(change, str):
            start.dp.distributed.config_json = change
        else:
            fields = json.loads(start.dp.distributed.config_json)
            change(fields)
            start.dp.distributed.config_json = json.dumps(fields)
    return tamper


def _eval_clip(start: pb.RoundStart) -> None:
    old = start.encoding.evaluation.dimension
    ev = start.encoding.evaluation
    ev.metrics[:] = ["loss"]
    ev.clip, ev.limbs, ev.limb_bits, ev.max_examples, ev.dimension = 0.0, 2, 20, 1000, 4
    start.encoding.dimension += 4 - old


ATTACKS: dict[str, tuple[str, Callable[[pb.RoundStart], None], str]] = {
    "dim": ("distributed", _tampered_config(lambda f: f.update(dim=10**400)), "dp.distributed.config_json.dim"),
    "nest": ("distributed", _tampered_config("[" * 100_000 + "]" * 100_000), "dp.distributed.config_json"),
    "n_clients": ("distributed", _tampered_config(lambda f: f.update(n_clients=10**400)),
                  "dp.distributed.config_json.n_clients"),
    "max_weight": ("none", lambda s: setattr(s.encoding, "max_weight", 1.7e308), "encoding.max_weight"),
    "dimension": ("none", lambda s: setattr(s.encoding, "dimension", s.encoding.dimension + 1), "encoding.dimension"),
    "evaluation_clip": ("none", _eval_clip, "encoding.evaluation"),
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_servers_number_the_site_cannot_use_is_a_decline_not_a_crash(tmp_path: Path, attack: str) -> None:
    """The review's repros (distributed_config_crash.py, submit_crash.py): the victim's thread died
    (OverflowError, RecursionError, RoundConfigError, EvaluationLayoutError), after training for the
    encoding numbers. Now it declines at admission naming the field, sends nothing about its data,
    and stays in the job; the others complete the round."""
    mode, change, field = ATTACKS[attack]
    consortium = Consortium.create(NAMES)
    holder: dict[str, TamperingServer] = {}

    def tamper(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start":
            change(resp.round_start)
        return resp

    def front(coordinator: Coordinator) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper, rebind=True)
        return holder["s"]

    policy = {"policy": consortium.policy(min_noise_multiplier=1.0)} if attack == "n_clients" else {}
    sites = [turnkey(synthetic, name, i, consortium, **(policy if name == VICTIM else {}))
             for i, name in enumerate(NAMES)]
    config = job_config(rounds=1, dp=mode, min_clients=3, stage_timeout=3.0, cohort_wait=ALL_JOIN_WAIT,
                        **DP_OPTIONS[mode])
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, service=front)
    assert errors == []
    server = holder["s"]
    answers = server.sent.named("respond_to_round")
    assert answers and not any(r.accept for r in answers)
    assert all(r.decline_reason.startswith(f"policy: {field}: ") for r in answers), answers[0].decline_reason
    assert not server.sent.named("submit_masked_input") and not server.sent.named("advertise_keys")
    assert results[0] is not None  # the victim's loop ended normally
    assert summary.completed_rounds == 1


# -- 8. the cohort size and degree behind the collusion bound ---------------------------------------

def test_the_bound_on_cohorts_is_the_secagg_configs() -> None:
    assert MAX_COHORT == MAX_CLIENTS == 1 << 20


@pytest.mark.parametrize(("n", "k", "graph", "parameter"), [
    (2**32 - 1, 2**31, "harary", "num_clients"),
    (MAX_COHORT + 1, 100, "harary", "num_clients"),
    (MAX_COHORT + 1, 0, "complete", "num_clients"),
    (1, 0, "complete", "num_clients"),
    (100, 100, "harary", "degree"),
    (100, 2**31, "harary", "degree"),
    (100, 101, "harary", "degree"),
])
def test_a_cohort_beyond_the_bound_or_a_degree_beyond_the_cohort_is_refused_at_once(
        n: int, k: int, graph: str, parameter: str) -> None:
    started = time.perf_counter()
    problem = cohort_problem(n, k, graph)
    assert problem is not None and problem[0] == parameter
    if n > MAX_COHORT:  # and the bound itself refuses it before its linear walk (25 min of CPU at uint32 n)
        with pytest.raises(ConfigError, match="num_clients: at most"):
            collusion_bound(n, k if k < n - 2 else 0, 1 / 3)
    assert time.perf_counter() - started < 0.1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 3000), graph=st.sampled_from(["complete", "harary"]), data=st.data())
def test_every_cohort_an_honest_server_plans_passes_the_check(n: int, graph: str, data: st.DataObject) -> None:
    degree = data.draw(st.sampled_from([0, 0, 8, 16, 64])) if graph == "harary" else 0  # 0: derived
    try:
        plan = plan_threshold(n, graph, degree=degree)
    except ConfigError:  # a degree too small for this n: the server refuses to start such a job
        assume(False)
    sent_graph = "harary" if plan.degree else "complete"  # what the coordinator announces (plan.spec)
    assert cohort_problem(n, plan.degree, sent_graph) is None
    assert cohort_bound(n, plan.degree, 1 / 3) == (plan.holders, plan.corrupt)


@pytest.mark.parametrize(("n", "k", "field"), [(2**32 - 1, 2**31, "secagg.cohort_size"),
                                               (4_000_000, 2_000_000, "secagg.cohort_size"),
                                               (1000, 1000, "secagg.degree")])
def test_a_trusting_site_declines_a_huge_cohort_before_computing_its_bound(n: int, k: int, field: str) -> None:
    """The review's repro (harary_bound_cpu.py): the real admission check under --trust-server took
    1.4 s at n = 4e6 and about 25 minutes at uint32 n, per distinct (n, k)."""
    from fedveil.clients.admission import check_threshold

    start = pb.RoundStart(secagg=pb.SecAggParams(cohort_size=n, graph="harary", degree=k, threshold=2,
                                                 max_corrupt_fraction=1 / 3))
    started = time.perf_counter()
    with pytest.raises(PolicyViolation) as err:
        check_threshold(TRUSTING, start)
    assert err.value.field == field
    assert time.perf_counter() - started < 0.1
