"""What a site reports (``ReportMetrics``) can neither crash the server nor fool the ledger.

Five reports an attacker sent: a noise multiplier of ``inf``, a tiny one, ``num_examples >= 2**63``
(each raised INTERNAL, the last after the report was marked received, so the correct retry was a
"replay"), ``steps = 1e8`` under ``--dp-accountant pld`` (the dashboard's run view computed for
minutes) and ``z = 1e6`` (shown with ε = 0.00 as if it were a fact). The sites are
``tests.server_helpers.Scripted`` clients; a :class:`~tests.site_helpers.Renumbered` transport lets
a test send its own reports, with the site's real header, just before the site's own report.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedveil.demo import healthcare
from fedveil.dp.bounded import WorkBound
from fedveil.dp.calibration import compute_epsilon
from fedveil.dp.report import build_report, render_text, report_to_dict
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage, ProtocolError
from fedveil.protocol.transport import InProcessTransport
from fedveil.server.dashboard import StoreRunSource
from fedveil.server.reports import CheckedSpend, SpendContext, verify_spend
from fedveil.server.store import RunStore, load_ledger
from tests.server_helpers import Scripted, make_job, run_job, vectors
from tests.site_helpers import Renumbered

pytestmark = pytest.mark.timeout(300)
DELTA = 1e-5
Q, Z, STEPS = 0.1, 1.0, 10  # one local epoch of 10 batches: what 100 records in batches of 10 allow
HONEST = pb.LocalPrivacySpend(epsilon=compute_epsilon(sample_rate=Q, noise_multiplier=Z, steps=STEPS, delta=DELTA),
                              delta=DELTA, noise_multiplier=Z, sample_rate=Q, steps=STEPS, accountant="rdp")


def _spend(**changes: Any) -> pb.LocalPrivacySpend:
    spend = pb.LocalPrivacySpend()
    spend.CopyFrom(HONEST)
    for k, v in changes.items():
        setattr(spend, k, v)
    return spend


def _site(coordinator: Any, name: str, i: int, privacy: pb.LocalPrivacySpend,
          before_report: Callable[[Renumbered, pb.MetricsReport], None] | None = None) -> Scripted:
    """A site reporting ``privacy`` in round 1; ``before_report(transport, its report)`` runs before its
    first report (the one in round 1: the final evaluation's comes later)."""
    box: list[Renumbered] = []

    def once(request: pb.MetricsReport) -> None:
        if before_report is not None and len(box) == 1:
            box.append(box[0])
            before_report(box[0], request)

    box.append(Renumbered(InProcessTransport(coordinator, name), {"report_metrics": once}))
    return Scripted(coordinator, name, vectors(2)[i], privacy=privacy, transport=box[0])


def _variant(t: Renumbered, real: pb.MetricsReport, **fields: Any) -> pb.MetricsReport:
    """The site's own report with a fresh sequence number and ``fields`` changed."""
    report = pb.MetricsReport()
    report.CopyFrom(real)
    report.header.sequence = t.next_sequence()
    for k, v in fields.items():
        if k == "privacy":
            report.privacy.CopyFrom(v)
        else:
            setattr(report, k, v)
    return report


def _local_job(tmp_path: Path, **overrides: Any) -> tuple[Any, RunStore]:
    # evaluation "clear": these tests send per-site metrics beside the spend, which a job accepts only when it
    # evaluates in the clear (the secure default refuses them: tests/test_server_modes.py), and under local DP
    # only when it asks for evaluation at all (evaluate_under_local_dp)
    settings = dict(rounds=1, dp="local", dp_local_noise_multiplier=Z, dp_delta=DELTA, round_timeout=120.0,
                    local_epochs=1, evaluation="clear", evaluate=True, evaluate_under_local_dp=True)
    settings.update(overrides)
    return make_job(tmp_path, ["x", "y"], **settings)


@pytest.mark.parametrize(("changes", "field", "allowed"), [
    ({"noise_multiplier": math.inf}, "privacy.noise_multiplier", "[1e-06, 1e+06] or 0"),
    ({"noise_multiplier": 1e-300}, "privacy.noise_multiplier", "[1e-06, 1e+06] or 0"),
])
@pytest.mark.slow
def test_a_noise_multiplier_out_of_range_is_invalid_and_the_retry_counts(
    tmp_path: Path, changes: dict[str, float], field: str, allowed: str
) -> None:
    coordinator, store = _local_job(tmp_path)
    refused: list[str] = []

    def before(t: Renumbered, real: pb.MetricsReport) -> None:
        with pytest.raises(MalformedMessage) as info:
            coordinator.report_metrics("x", _variant(t, real, privacy=_spend(**changes)))
        refused.append(str(info.value))

    summary = run_job(coordinator, [_site(coordinator, "x", 0, HONEST, before), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed", (summary, store.rounds(coordinator.run_id))
    assert len(refused) == 1 and refused[0].startswith(field) and allowed in refused[0]
    assert store.evaluations(coordinator.run_id, 0) == [("x", 100, {"loss": 0.5}), ("y", 100, {"loss": 0.5})]
    ledger = load_ledger(tmp_path / "run.db")
    assert [e.event.noise_multiplier for e in ledger.entries if e.party == "x"] == [Z]  # type: ignore[union-attr]
    store.close()


def test_num_examples_too_large_is_invalid_and_a_failed_store_leaves_the_retry_possible(tmp_path: Path) -> None:
    coordinator, store = _local_job(tmp_path)
    seen: list[str] = []

    def before(t: Renumbered, real: pb.MetricsReport) -> None:
        with pytest.raises(MalformedMessage, match=r"^num_examples: 9223372036854775808 is outside the allowed"):
            coordinator.report_metrics("x", _variant(t, real, num_examples=2**63))
        # the store itself fails (its table is gone): nothing of the report is kept or marked received
        with sqlite3.connect(tmp_path / "run.db") as other:
            other.execute("DROP TABLE client_privacy")
        with pytest.raises(sqlite3.OperationalError):
            coordinator.report_metrics("x", _variant(t, real))
        seen.append(repr(store.evaluations(coordinator.run_id, 0)))
        RunStore(tmp_path / "run.db").close()  # opening a store creates its missing tables
        # then the site's own report (a retry with a new sequence number) goes through below

    y = Scripted(coordinator, "y", vectors(2)[1])  # reports nothing: the store fails for x alone
    summary = run_job(coordinator, [_site(coordinator, "x", 0, HONEST, before), y])
    assert summary.status == "completed" and seen == ["[]"]
    assert store.evaluations(coordinator.run_id, 0) == [("x", 100, {"loss": 0.5})]
    assert [n for _, n, _ in store.client_privacy(coordinator.run_id)] == ["x"]
    assert len([e for e in load_ledger(tmp_path / "run.db").entries if e.party == "x"]) == 1  # recorded once
    store.close()


@pytest.mark.slow
def test_an_honest_report_is_verified_and_shown_as_the_servers_figure(tmp_path: Path) -> None:
    coordinator, store = _local_job(tmp_path)
    summary = run_job(coordinator, [_site(coordinator, "x", 0, HONEST), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed"
    rows = {n: row for _, n, row in store.client_privacy(coordinator.run_id)}
    assert rows["x"]["verified"] is True and rows["x"]["source"] == "reported by the site"
    assert rows["x"]["epsilon_reported"] == pytest.approx(HONEST.epsilon)
    source = StoreRunSource(tmp_path / "run.db", healthcare.task)
    try:
        run = source.get_run(coordinator.run_id)
        assert run is not None
        last = run["rounds"][-1]
        assert last["epsilon_sample"]["x"] == pytest.approx(HONEST.epsilon)
        assert last["epsilon_sample_reported"]["x"] == pytest.approx(HONEST.epsilon)
        assert last["epsilon_sample_unverified"] == {} and last["epsilon_sample_max"] == pytest.approx(HONEST.epsilon)
    finally:
        source.close()
        store.close()


@pytest.mark.slow
def test_an_implausible_noise_multiplier_is_unverified_not_shown_as_a_fact(tmp_path: Path) -> None:
    coordinator, store = _local_job(tmp_path)
    fake = _spend(noise_multiplier=1e6, epsilon=0.0)  # "my records are perfectly private"
    summary = run_job(coordinator, [_site(coordinator, "x", 0, fake), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed"
    rows = {n: row for _, n, row in store.client_privacy(coordinator.run_id)}
    assert rows["x"]["verified"] is False and rows["x"]["epsilon_reported"] == 0.0
    assert any("noise multiplier 1e+06 is not the job's 1" in r for r in rows["x"]["unverified"])
    source = StoreRunSource(tmp_path / "run.db", healthcare.task)
    try:
        run = source.get_run(coordinator.run_id)
        assert run is not None
        last = run["rounds"][-1]
        assert last["epsilon_sample"]["x"] is None  # no number shown as a fact ...
        assert last["epsilon_sample_reported"]["x"] == 0.0  # ... the site's claim, labelled as such
        assert "noise multiplier" in last["epsilon_sample_unverified"]["x"]
        assert last["epsilon_sample"]["y"] == pytest.approx(HONEST.epsilon)
        assert last["epsilon_sample_max"] is None and last["budget_remaining"] == {}
    finally:
        source.close()
    data = report_to_dict(build_report(load_ledger(tmp_path / "run.db")))
    assert data["client_epsilons"]["x"] is None and "noise multiplier" in data["client_epsilons_unverified"]["x"]
    assert data["rounds"][0]["clients"]["x"]["source"] == "computed from parameters reported by the site"
    assert "UNVERIFIED" in render_text(build_report(load_ledger(tmp_path / "run.db")))
    store.close()


@pytest.mark.slow
def test_claimed_steps_of_1e8_under_pld_render_in_bounded_work(tmp_path: Path) -> None:
    coordinator, store = _local_job(tmp_path, dp_accountant="pld")
    flood = _spend(sample_rate=0.5, steps=10**8, epsilon=1.0, accountant="pld")
    summary = run_job(coordinator, [_site(coordinator, "x", 0, flood), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed"
    rows = {n: row for _, n, row in store.client_privacy(coordinator.run_id)}
    assert rows["x"]["verified"] is False and any("100000000 steps exceed" in r for r in rows["x"]["unverified"])
    source = StoreRunSource(tmp_path / "run.db", healthcare.task)
    try:
        run = source.get_run(coordinator.run_id)
        assert run is not None
        views = source.ledger_views
        # the PLD composition of 1e8 steps was refused; RDP's bound (linear in steps) stood in
        assert views.bound.fallbacks >= 1 and views.bound.numeric_evaluations <= views.bound.max_numeric_evaluations
        last = run["rounds"][-1]
        assert "x" in last["epsilon_rdp_bound"] and last["epsilon_sample"]["x"] is None
        assert "y" not in last["epsilon_rdp_bound"] and last["epsilon_sample"]["y"] is not None
        # computed once per ledger version
        source.get_run(coordinator.run_id)
        source.list_runs()
        assert views.computations == 1
    finally:
        source.close()
    bound = WorkBound()
    report = build_report(load_ledger(tmp_path / "run.db"), bound)
    assert report.rounds[0].clients["x"].accountant == "rdp" and report.rounds[0].clients["y"].accountant == "pld"
    assert bound.fallbacks >= 1
    store.close()


@pytest.mark.slow
def test_the_server_checks_claims_against_what_it_knows() -> None:
    def spend(**kw: Any) -> CheckedSpend:
        base = dict(epsilon=HONEST.epsilon, delta=DELTA, noise_multiplier=Z, sample_rate=Q, steps=STEPS,
                    accountant="rdp")
        base.update(kw)
        return CheckedSpend(**base)  # type: ignore[arg-type]

    fixed = SpendContext(delta=DELTA, noise_multiplier=Z, local_epochs=1)
    target = SpendContext(delta=DELTA, noise_multiplier=None, local_epochs=1)
    assert verify_spend(spend(), 100, [], fixed).verified
    cases = [
        (spend(delta=1e-3), 100, fixed, "δ = 0.001 is not the job's"),
        (spend(noise_multiplier=2.0), 100, fixed, "not the job's 1"),
        (spend(noise_multiplier=500.0, epsilon=0.0), 100, target, "far above"),
        (spend(steps=11), 100, fixed, "11 steps exceed what 1 local epoch(s)"),
        (spend(), 0, fixed, "num_examples was not reported"),
        (spend(), 5, fixed, "more than the 5 records"),
        (spend(epsilon=0.1), 100, fixed, "the server recomputes"),
        (spend(accountant="magic"), 100, fixed, "unknown"),
        (spend(noise_multiplier=0.0), 100, fixed, "no sample-level guarantee"),
    ]
    for s, n, ctx, reason in cases:
        verdict = verify_spend(s, n, [], ctx)
        assert not verdict.verified and any(reason in r for r in verdict.reasons), (reason, verdict)
    # a PLD claim may be tighter than RDP's bound, but not implausibly so
    eps_pld = compute_epsilon(sample_rate=Q, noise_multiplier=Z, steps=STEPS, delta=DELTA, accountant="pld")
    assert verify_spend(spend(epsilon=eps_pld, accountant="pld"), 100, [], fixed).verified
    assert not verify_spend(spend(epsilon=eps_pld / 3, accountant="pld"), 100, [], fixed).verified


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5e-324, 2.2e-308, 1e-300, 1e-12, 1e-6, 0.5, 1.0, 1e6, 1e300, math.inf, -math.inf,
                     math.nan, -1.0]),
)
_COUNTS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]))


def _or_any(valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any] = _NUMBERS) -> st.SearchStrategy[Any]:
    """Half the time a value in range (so reports get all the way to the store and the ledger)."""
    return st.one_of(valid, anything)


@pytest.mark.slow
def test_no_report_a_client_can_send_raises_anything_but_a_protocol_error(tmp_path: Path) -> None:
    """Fuzz every numeric field of ``ReportMetrics`` (bounded budget) in a real round: only
    ``ProtocolError`` subclasses (status codes) may come out, never INTERNAL."""
    coordinator, store = _local_job(tmp_path, dp_accountant="pld")
    fuzzed: list[int] = []
    accepted: list[int] = []

    def before(t: Renumbered, real: pb.MetricsReport) -> None:
        @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(eps=_or_any(st.floats(0, 1e3)), delta=_or_any(st.floats(1e-12, 0.5)),
               z=_or_any(st.floats(1e-6, 1e6)), q=_or_any(st.floats(1e-12, 1.0)),
               steps=_or_any(st.integers(0, 10**9), _COUNTS), n=_or_any(st.integers(0, 10**12), _COUNTS),
               value=_or_any(st.floats(-1e300, 1e300)),
               accountant=st.sampled_from(["rdp", "pld", "prv", "", "x" * 40, "\x00"]),
               version=st.integers(0, 2**32 - 1))
        def fuzz(eps: float, delta: float, z: float, q: float, steps: int, n: int, value: float, accountant: str,
                 version: int) -> None:
            spend = pb.LocalPrivacySpend(epsilon=eps, delta=delta, noise_multiplier=z, sample_rate=q, steps=steps,
                                         accountant=accountant)
            report = _variant(t, real, num_examples=n, privacy=spend)
            report.metrics.add(name="auc", value=value)
            if version % 4 == 0:
                report.model_version = version
            rnd = coordinator._round
            if rnd is not None:
                rnd.evaluated.discard("x")  # so each example goes all the way (store, ledger), not "already received"
            try:
                coordinator.report_metrics("x", report)
                accepted.append(1)
            except ProtocolError:
                pass
            fuzzed.append(1)

        fuzz()
        rnd = coordinator._round
        if rnd is not None:  # the site's own report follows: it must not be "already received" (or it spins)
            rnd.evaluated.discard("x")

    summary = run_job(coordinator, [_site(coordinator, "x", 0, HONEST, before), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed" and len(fuzzed) >= 80 and len(accepted) >= 4
    assert store.dropouts(coordinator.run_id) == []  # x's own report after the fuzz was taken: no wait, no drop
    # whatever was accepted left a ledger and a run view that still compute, within the bound
    source = StoreRunSource(tmp_path / "run.db", healthcare.task)
    try:
        run = source.get_run(coordinator.run_id)
        assert run is not None and run["rounds"]
    finally:
        source.close()
    store.close()


def test_the_rdp_check_of_a_report_runs_without_the_coordinators_lock(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An attacker's parameters can make the RDP recomputation take seconds: it must not stall the
    job. While x's check runs, another thread takes the coordinator's lock at once."""
    import threading

    from fedveil.server.coordinator import site_reports

    coordinator, store = _local_job(tmp_path)
    genuine = site_reports.verify_spend
    waits: list[float] = []
    held: list[bool] = []

    def slow_verify(*args: Any, **kwargs: Any) -> Any:
        held.append(coordinator._cond._is_owned())  # type: ignore[attr-defined]
        other = threading.Thread(target=lambda: _timed_lock(coordinator, waits))
        other.start()
        other.join(10)
        return genuine(*args, **kwargs)

    monkeypatch.setattr(site_reports, "verify_spend", slow_verify)
    summary = run_job(coordinator, [_site(coordinator, "x", 0, HONEST), _site(coordinator, "y", 1, HONEST)])
    assert summary.status == "completed"
    assert held and not any(held)
    assert waits and max(waits) < 1.0
    rows = {n: row for _, n, row in store.client_privacy(coordinator.run_id)}
    assert rows["x"]["verified"] is True  # the check still ran, and its verdict was stored
    store.close()


def _timed_lock(coordinator: Any, waits: list[float]) -> None:
    import time

    start = time.monotonic()
    with coordinator._cond:
        waits.append(time.monotonic() - start)
