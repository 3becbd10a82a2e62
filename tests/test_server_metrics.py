"""``--metrics-port``: Prometheus metrics of a real server, scraped over HTTP while its job runs
over loopback gRPC with scripted sites (one of which drops out)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedveil.server.events import JobFinished, RoundAborted, RoundCompleted, RoundStarted, StageClosed
from fedveil.server.observability import ObservabilityConfig, ObservabilityConfigError
from fedveil.server.prometheus_metrics import JobMetrics, MetricsEndpoint, MetricsEndpointError
from tests.ops_helpers import free_port, join_sites, run_sites, start_served_job
from tests.server_helpers import Scripted, make_job, run_job, vectors


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels → value, from the text exposition format."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.mark.slow
def test_a_scrape_during_a_real_job_shows_the_counters_moving(tmp_path: Path) -> None:
    port = free_port()
    job = start_served_job(tmp_path, ["a", "b", "c", "d"], rounds=3, stage_timeout=3.0,
                           observability=ObservabilityConfig(metrics_port=port))
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)  # the job waits for its cohort: nothing has happened yet
    assert value(before, "fedveil_rounds_completed_total") == 0
    assert value(before, "fedveil_connected_sites") == 0
    assert value(before, "fedveil_job_running") == 1
    assert total(before, "fedveil_rpc_received_bytes_total") == 0

    sites = job.sites()
    # site d goes silent in rounds 1 and 2: a dropout at that stage, and rounds that wait for its deadline
    sites[3].silent_at.update({(1, 1): "masked-input", (2, 1): "masked-input"})
    threads = run_sites(sites)
    during: dict = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.thread.is_alive():
        samples = scrape(url)
        if 1 <= value(samples, "fedveil_rounds_completed_total") < 3:
            during = samples
            break
        time.sleep(0.05)
    join_sites(sites, threads)
    summary = job.finish()
    assert summary.status == "completed" and summary.completed_rounds == 3

    assert during, "no scrape caught the job between its first and last round"
    assert value(during, "fedveil_connected_sites") == 4
    assert value(during, "fedveil_rounds_started_total", purpose="train") >= 1
    assert value(during, "fedveil_model_version") >= 1
    assert value(during, "fedveil_dropouts_total", stage="masked-input") >= 1
    assert value(during, "fedveil_stage_duration_seconds_count", stage="training") >= 1
    assert value(during, "fedveil_round_duration_seconds_count") >= 1
    assert value(during, "fedveil_rpc_received_bytes_total", rpc="Join") > 0
    assert value(during, "fedveil_rpc_sent_bytes_total", rpc="Poll") > 0
    assert value(during, "fedveil_rpc_sent_bytes_total", rpc="FetchModel") > 0  # models go out in chunks
    assert "fedveil_user_epsilon" not in {n for n, _ in during}  # no user-level DP in this job

    with pytest.raises(OSError):
        scrape(url)  # the endpoint closed with the server


@pytest.mark.slow
def test_job_metrics_follow_events_and_the_user_level_epsilon_of_the_released_ledger(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    coordinator, store = make_job(tmp_path, names, rounds=2, weighted=False, dp="central", dp_clip=1.0,
                                  dp_noise_multiplier=2.0)
    metrics = JobMetrics(connected=coordinator.connected_sites)
    coordinator.listeners.add(metrics)
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", free_port())
    try:
        small = [v * 0.2 for v in vectors(3)]  # within the clip norm: every round is released
        summary = run_job(coordinator, [Scripted(coordinator, n, v) for n, v in zip(names, small, strict=True)])
        samples = scrape(endpoint.url)
    finally:
        endpoint.stop()
        store.close()
    assert summary.status == "completed" and summary.epsilon is not None
    assert value(samples, "fedveil_rounds_completed_total") == 2
    assert value(samples, "fedveil_rounds_started_total", purpose="train") == 2
    assert value(samples, "fedveil_user_epsilon") == pytest.approx(summary.epsilon, rel=1e-9)
    assert value(samples, "fedveil_user_delta") == pytest.approx(1e-5)
    stages = {dict(labels)["stage"] for (n, labels), v in samples.items()
              if n == "fedveil_stage_duration_seconds_count" and v > 0}
    assert {"training", "masked-input", "unmasking"} <= stages, stages


@pytest.mark.slow
def test_under_local_dp_the_largest_sites_sample_level_epsilon_is_a_gauge(tmp_path: Path) -> None:
    from fedveil.dp.ledger import PrivacyLedger
    from fedveil.server.coordinator import Coordinator
    from fedveil.server.store import RunStore
    from fedveil.tasks.synthetic import task as synthetic
    from tests.attack_helpers import RESPONSIVE_DEADLINES, Consortium, job_config, turnkey
    from tests.attack_helpers import run_job as run_sites

    names = [f"site-{i}" for i in range(4)]
    consortium = Consortium.create(names)
    metrics = JobMetrics()

    class Observed(Coordinator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.listeners.add(metrics)

    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(names)]
    config = job_config(rounds=2, dp="local", dp_local_noise_multiplier=1.0, **RESPONSIVE_DEADLINES)
    summary, _results, errors = run_sites(tmp_path, config, synthetic, sites, coordinator_cls=Observed)
    assert not errors and summary.completed_rounds == 2, (errors, summary)
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", free_port())
    try:
        samples = scrape(endpoint.url)
    finally:
        endpoint.stop()
    with RunStore(tmp_path / "run.sqlite") as store:
        ledger = PrivacyLedger.from_json(store.ledger_json(summary.run_id) or "")
    released = [h.epsilon_cumulative for n in names for h in ledger.party_history(n)]
    assert value(samples, "fedveil_site_epsilon_max") > 0
    assert value(samples, "fedveil_site_epsilon_max") <= max(released) + 1e-9
    assert value(samples, "fedveil_site_delta_max") == pytest.approx(1e-5)
    assert "fedveil_user_epsilon" not in {n for n, _ in samples}  # no user-level claim under local DP


def test_each_server_has_its_own_registry_and_aborts_and_dropouts_count_by_stage() -> None:
    first, second = JobMetrics(), JobMetrics()  # a global registry would refuse the second
    first.on_event(RoundStarted("r", 1, 1, ("a", "b"), "train"))
    first.on_event(StageClosed("r", 1, 1, "share-keys", 0.25, 1, {"b": "share-keys"}))
    first.on_event(RoundAborted("r", 1, 1, "share-keys", "too few sites"))
    first.on_event(RoundCompleted("r", 1, 2, 2, np.zeros(3), None, {"duration_s": 1.5}))
    first.on_event(JobFinished("r", {}))
    get = first.registry.get_sample_value
    assert get("fedveil_round_attempts_aborted_total", {"stage": "share-keys"}) == 1
    assert get("fedveil_dropouts_total", {"stage": "share-keys"}) == 1
    assert get("fedveil_stage_duration_seconds_sum", {"stage": "share-keys"}) == 0.25
    assert get("fedveil_round_duration_seconds_sum") == 1.5
    assert get("fedveil_rounds_completed_total") == 1 and get("fedveil_job_running") == 0
    assert second.registry.get_sample_value("fedveil_rounds_completed_total") == 0


def test_bad_metrics_settings_and_a_taken_port_name_their_field() -> None:
    with pytest.raises(ObservabilityConfigError) as bad_port:
        ObservabilityConfig(metrics_port=70000)
    assert bad_port.value.field == "metrics_port"
    with pytest.raises(ObservabilityConfigError) as bad_host:
        ObservabilityConfig(metrics_port=9100, metrics_host="not an address")
    assert bad_host.value.field == "metrics_host"
    metrics = JobMetrics()
    first = MetricsEndpoint(metrics.registry, "127.0.0.1", free_port())
    try:
        with pytest.raises(MetricsEndpointError) as taken:
            MetricsEndpoint(JobMetrics().registry, "127.0.0.1", first.port)
        assert taken.value.field == "metrics_port" and str(first.port) in str(taken.value)
    finally:
        first.stop()
