"""Coordinator modes: SecAgg+ (Harary graph), local-DP spend reports, distributed DP end to end,
and ``fedveil server`` argument errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.cli import main
from fedveil.clients.api import run_client
from fedveil.clients.session import Federation
from fedveil.commands.common import USAGE_EXIT_CODE
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg import ConfigError
from fedveil.server.config import ServerConfig, ServerConfigError
from fedveil.server.coordinator import JobError
from fedveil.server.store import load_ledger
from fedveil.task import load_task
from tests.identity_helpers import TEST_AUTHORITY, secure_options
from tests.server_helpers import TASK, Scripted, make_job, run_job, vectors

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_harary_graph_round_with_a_dropout_gives_the_exact_mean(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedveil.server")
    names = [f"h{i}" for i in range(8)]
    vecs = vectors(8)
    coordinator, store = make_job(tmp_path, names, secagg="harary", secagg_degree=4, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[5].silent_at[(1, 1)] = "share-keys"
    summary = run_job(coordinator, clients)
    assert summary.status == "completed"
    (rec,) = store.rounds(coordinator.run_id)
    # h = 5 holders, c = 2 of the cohort's floor(8/3) colluders may hold a client's shares: t = 4.
    assert rec.threshold == 4 and rec.survivors == 7 and rec.stats["dropped"] == []
    assert store.dropouts(coordinator.run_id) == [(1, 1, "h5", "share-keys", "missed the stage deadline")]
    (line,) = [r.getMessage() for r in caplog.records if "secure aggregation" in r.getMessage()]
    assert "n=8, k=4, h=5, t=4, c=2 (f=0.3333), collusion failure 0, dropout failure 2^" in line
    expected = sum(v for i, v in enumerate(vecs) if i != 5) / 7
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), expected, atol=1e-4)  # type: ignore[arg-type]
    store.close()


def test_server_config_derives_safe_thresholds_in_both_modes() -> None:
    """Default t: the smallest with 2t > h + c, active or not (secure by default); an explicit t
    must satisfy the rule with --active-adversary and only t > c without, and is capped at h for
    a smaller cohort."""
    base = dict(task=TASK, rounds=1, clients_per_round=10, min_clients=4)
    for active in (False, True):
        plan = ServerConfig.from_flat(**base, active_adversary=active).secagg_plan(10)  # type: ignore[arg-type]
        assert (plan.holders, plan.corrupt, plan.threshold) == (10, 3, 7)
        assert ServerConfig.from_flat(**base, active_adversary=active).secagg_plan(4).threshold == 3  # c = 1
    passive = ServerConfig.from_flat(**base, threshold=4, active_adversary=False)  # type: ignore[arg-type]  # active by default
    assert passive.secagg_plan(10).threshold == 4 and passive.secagg_plan(4).threshold == 4  # capped at h = 4
    assert ServerConfig.from_flat(**base, threshold=6, max_corrupt_fraction=0.0,  # type: ignore[arg-type]
                        active_adversary=True).secagg_plan(10).threshold == 6
    with pytest.raises(ServerConfigError, match=r"--threshold: t=6 does not satisfy 2t > h \+ c = 10 \+ 3") as err:
        ServerConfig.from_flat(**base, threshold=6, active_adversary=True)  # type: ignore[arg-type]
    assert err.value.flag == "--threshold"
    with pytest.raises(ServerConfigError, match="--max-corrupt-fraction"):
        ServerConfig.from_flat(**base, max_corrupt_fraction=0.5)  # type: ignore[arg-type]
    # Harary k = 16 with an explicit t = 12, valid for 20 clients (h = 17, c = 6); a cohort of 18
    # makes the graph complete (h = 18, c = 6, t >= 13): that round refuses to start.
    harary = ServerConfig.from_flat(task=TASK, rounds=1, clients_per_round=20, min_clients=18, secagg="harary",
                          secagg_degree=16, threshold=12, active_adversary=True)
    assert (harary.secagg_plan(20).holders, harary.secagg_plan(20).corrupt) == (17, 6)
    with pytest.raises(ConfigError, match=r"2t > h \+ c = 18 \+ 6"):
        harary.secagg_plan(18)


def test_an_explicit_threshold_unsafe_for_the_cohort_stops_the_job(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(18)]
    coordinator, store = make_job(tmp_path, names, clients_per_round=20, min_clients=18, secagg="harary",
                                  secagg_degree=16, threshold=12, active_adversary=True)
    with pytest.raises(JobError, match=r"cohort of 18") as refused:
        coordinator._threshold(18)
    assert refused.value.field == "threshold"  # the command prints it as --threshold
    store.close()


@pytest.mark.parametrize(("settings", "why"), [
    ({"evaluate": True}, "evaluation 'secure'; they travel only as secure sums"),
    ({}, "evaluation 'off'; it asks for none"),
    # under local DP a job evaluates only with evaluate_under_local_dp, even in the clear
    ({"evaluate": True, "dp": "local", "evaluation": "clear"}, "evaluation 'off'; it asks for none"),
])
def test_per_site_metrics_are_refused_unless_the_job_evaluates_in_the_clear(tmp_path: Path, settings: dict[str, Any],
                                                                            why: str) -> None:
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol.errors import MalformedMessage
    from fedveil.protocol.transport import ClientSession

    coordinator, store = make_job(tmp_path, ["x", "y"], rounds=1, **settings)
    session = ClientSession.from_join(coordinator.join("x", pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg")))
    with pytest.raises(MalformedMessage, match=f"per-site metrics are not accepted by this job \\({why}\\)"):
        coordinator.report_metrics("x", pb.MetricsReport(header=session.header(1, b"n" * 16), model_version=0,
                                                         num_examples=10, metrics=[pb.Metric(name="loss", value=1)]))
    store.close()


@pytest.mark.slow
def test_local_dp_spend_reports_reach_the_ledger_and_the_budget_report(tmp_path: Path) -> None:
    names = ["x", "y"]
    coordinator, store = make_job(tmp_path, names, rounds=2, dp="local")
    spend = pb.LocalPrivacySpend(epsilon=0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.1, steps=20,
                                 accountant="rdp")
    clients = [Scripted(coordinator, "x", vectors(1)[0], privacy=spend), Scripted(coordinator, "y", vectors(2)[1])]
    summary = run_job(coordinator, clients)
    assert summary.status == "completed"
    ledger = load_ledger(tmp_path / "run.db")
    assert ledger.clients == ["x"] and ledger.rounds == [1, 2]
    assert ledger.epsilon("x") > 0
    reports = store.client_privacy(coordinator.run_id)
    assert [(r, n) for r, n, _ in reports] == [(1, "x"), (2, "x")] and reports[0][2]["in_ledger"] is True
    assert store.evaluations(coordinator.run_id, 0) == []  # secure evaluation: no site's own row, ever
    store.close()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["budget", "report", str(tmp_path / "run.db"), "--format", "json"]) == 0
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    assert len(report["rounds"]) == 2


def test_distributed_dp_job_with_real_clients(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    names = ["p", "q", "r"]
    coordinator, store = make_job(tmp_path, names, rounds=2, dp="distributed", dp_clip=1.0, dp_noise_multiplier=0.5,
                              dp_bits=24, evaluate=True, active_adversary=True)  # real sites: the secure default
    task = load_task(TASK)
    outcomes: dict[str, list[str]] = {}

    def client(i: int, name: str) -> None:
        fed = Federation(InProcessTransport(coordinator, name), task.name, task.build_model(),
                         secure_options(name, seed=i, poll_wait_ms=500))
        outcomes[name] = [o.outcome for o in run_client(fed, task, task.synthetic_data(i, 3, 3))]  # type: ignore[misc]

    threads = [threading.Thread(target=client, args=(i, n), daemon=True) for i, n in enumerate(names)]
    for th in threads:
        th.start()
    summary = coordinator.run()
    for th in threads:
        th.join(60)
    assert summary.status == "completed" and summary.completed_rounds == 2
    assert outcomes == {n: ["completed", "completed"] for n in names}
    ledger = load_ledger(tmp_path / "run.db")
    assert {e.mechanism for e in ledger.entries} == {"distributed-skellam"}
    assert summary.epsilon == pytest.approx(ledger.epsilon())
    rec = store.rounds(coordinator.run_id)[0]
    assert rec.stats["noise_stddev_sum"] > 0
    assert np.isfinite(store.aggregate(coordinator.run_id, 2)).all()  # type: ignore[arg-type]
    store.close()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--clients-per-round", "3", "--min-clients", "5"], "error: --min-clients: must be between 2 and"),
        (["--clients-per-round", "3", "--listen", "nowhere"], "error: --listen: expected HOST:PORT"),
        (["--clients-per-round", "3", "--dp-adaptive-clipping"], "error: --dp-adaptive-clipping: only with"),
        (["--clients-per-round", "1"], "error: --clients-per-round: must be at least 2"),
        (["--clients-per-round", "6", "--threshold", "4", "--active-adversary"],
         "error: --threshold: t=4 does not satisfy 2t > h + c = 6 + 2 (h holders of each client's shares, c "
         "colluders among them); the smallest safe t is 5"),
        (["--clients-per-round", "6", "--threshold", "2", "--passive"],
         "error: --threshold: t=2 does not exceed the c=2 colluders among a client's h=6 holders"),
        (["--clients-per-round", "6", "--threshold", "4"],  # active mode is the default
         "error: --threshold: t=4 does not satisfy 2t > h + c = 6 + 2"),
        (["--clients-per-round", "6", "--max-corrupt-fraction", "0.5"],
         "error: --max-corrupt-fraction: must be in [0, 0.5)"),
        (["--clients-per-round", "100", "--secagg", "harary", "--secagg-degree", "4"],
         "error: --secagg-degree: c=4 colluders may be all 4 neighbours of a client"),
        (["--clients-per-round", "3", "--insecure", "--tls-cert", "x.pem"], "error: --insecure: cannot be"),
        (["--clients-per-round", "3", "--tls-cert", "missing.pem", "--tls-key", "k.pem", "--no-insecure"], None),
        # values that pass a sign check but overflow the wire format or gRPC
        (["--clients-per-round", "3", "--stage-timeout", "5e6"], "error: --stage-timeout: must be a positive number"),
        (["--clients-per-round", "3", "--round-timeout", "1e300"], "error: --round-timeout: must be a positive"),
        (["--clients-per-round", "3", "--local-epochs", "99999999999999999999"], "error: --local-epochs: must be"),
        (["--clients-per-round", "3", "--learning-rate", "inf"], "error: --learning-rate: must be a finite"),
        (["--clients-per-round", "3", "--max-message-mb", "2048"], "error: --max-message-mb: must be at least 1"),
        (["--clients-per-round", "3", "--max-message-mb", "1e-9"], "error: --max-message-mb: must be at least 1"),
        (["--clients-per-round", "3", "--dp", "distributed", "--dp-bits", "62"], "error: --dp-bits: must be between"),
    ],
)
def test_server_argument_errors(tmp_path: Path, extra: list[str], expected: str | None,
                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "run.db"), "--task", TASK,
            "--rounds", "1"]
    if expected is None:  # an unreadable certificate
        extra = [e for e in extra if e != "--no-insecure"]
        expected = "error: --tls-cert: cannot read 'missing.pem'"
    elif "--insecure" not in extra and "--tls-cert" not in extra:
        extra = [*extra, "--insecure"]
    if "--listen" in extra:
        i = args.index("--listen")
        args[i + 1] = extra[extra.index("--listen") + 1]
        extra = [e for j, e in enumerate(extra) if e != "--listen" and extra[j - 1] != "--listen"]
    assert main(args + extra) == USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "run.db").exists()


@pytest.mark.slow
def test_long_polls_are_capped_so_they_cannot_take_every_worker(tmp_path: Path) -> None:
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol.transport import ClientSession

    coordinator, store = make_job(tmp_path, ["a", "b"], poll_wait=3.0)
    coordinator.max_waiting_polls = 2  # half of it for sites outside a running round: one held poll
    sessions = {}
    for name in ("a", "b"):
        t = InProcessTransport(coordinator, name)
        sessions[name] = (t, ClientSession.from_join(t.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                                            task_name="synthetic-logreg"))))
    held: list[pb.PollResponse] = []
    ta, sa = sessions["a"]
    waiter = threading.Thread(target=lambda: held.append(ta.poll(pb.PollRequest(header=sa.header(),
                                                                                   max_wait_ms=1500))))
    waiter.start()
    deadline = time.monotonic() + 5
    while coordinator._waiting_polls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    tb, sb = sessions["b"]
    started = time.monotonic()
    busy = tb.poll(pb.PollRequest(header=sb.header(), max_wait_ms=1500))
    assert time.monotonic() - started < 1.0
    assert busy.WhichOneof("instruction") == "wait" and "busy" in busy.wait.reason
    # an idle site is sent away for a quarter to 1.25 poll waits (no re-poll storm), and it still
    # counts as available for a cohort (due back within a poll wait, or seen within the window)
    assert 750 <= busy.wait.retry_after_ms <= 3750
    with coordinator._cond:
        assert "b" in coordinator._available()
    waiter.join(10)
    assert held and held[0].WhichOneof("instruction") == "wait" and "waiting for a cohort" in held[0].wait.reason
    store.close()


@pytest.mark.slow
def test_active_adversary_mode_with_signed_keys_and_consistency_check(tmp_path: Path) -> None:
    from tests.server_helpers import ActiveScripted

    names = ["a", "b", "c", "d"]
    vecs = vectors(4)
    coordinator, store = make_job(tmp_path, names, active_adversary=True, weighted=False)
    clients = [ActiveScripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[3].silent_at = "masked-input"
    summary = run_job(coordinator, clients)  # type: ignore[arg-type]
    assert summary.status == "completed"
    (rec,) = store.rounds(coordinator.run_id)
    assert rec.survivors == 3 and rec.stats["dropped"] == ["d"]
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(vecs[:3]) / 3, atol=1e-4)  # type: ignore[arg-type]
    assert [c.results for c in clients] == [[(1, pb.ROUND_OUTCOME_COMPLETED)]] * 3 + [[(1, pb.ROUND_OUTCOME_DROPPED)]]
    store.close()


def test_active_adversary_mode_needs_identity_keys(tmp_path: Path) -> None:
    names = ["a", "b"]
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol.errors import Incompatible, PermissionDenied

    coordinator, store = make_job(tmp_path, names, active_adversary=True, weighted=False)
    with pytest.raises(Incompatible, match="active-adversary mode"):
        coordinator.join("a", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg"))
    now = int(time.time())
    key_a, mine = TEST_AUTHORITY.identity("a", now=now)
    public_a = key_a.public_key().public_bytes_raw()
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    store.enroll("a", rotate=True, identity_public_key=public_a)
    with pytest.raises(PermissionDenied, match="differs from the key enrolled"):
        coordinator.join("a", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg",
                                             identity_public_key=stranger))
    # the enrolled key alone is not enough: the authority must vouch for it (a credential naming "a" and that key)
    with pytest.raises(Incompatible, match="identity_credential"):
        coordinator.join("a", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg"))
    other = TEST_AUTHORITY.issue("a", stranger, not_before=now - 60, not_after=now + 3600)
    with pytest.raises(PermissionDenied, match="another site name or identity key"):
        coordinator.join("a", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg",
                                             identity_credential=other.encode()))
    joined = coordinator.join("a", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg",
                                                  identity_credential=mine.encode()))
    assert joined.client_name == "a"
    store.close()


def test_a_refused_value_from_the_job_file_is_named_as_the_file_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A value out of range in ``--config`` is named ``section.key`` in that file, as the file's own
    type errors are; the same value given as a flag (which overrides the file) is named by its flag."""
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\ntask = "{TASK}"\nrounds = 1\nclients_per_round = 3\n\n'
                   '[privacy]\ndp = "central"\ndp_clip = -1.0\ndp_noise_multiplier = 1.1\n', encoding="utf-8")
    args = ["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "run.db"), "--insecure",
            "--config", str(job)]
    assert main(args) == USAGE_EXIT_CODE
    assert capsys.readouterr().err.strip() == \
        f"error: privacy.dp_clip in --config {job}: must be a positive number (got -1.0)"
    assert main([*args, "--dp-clip", "-2"]) == USAGE_EXIT_CODE
    assert capsys.readouterr().err.strip() == "error: --dp-clip: must be a positive number (got -2.0)"
