"""The front doors in ``fedveil.__all__``: each resolves lazily, is one call, and behaves like its command."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedveil
from fedveil.cli import main
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger
from fedveil.front_doors import FrontDoorError
from fedveil.server.config import ServerConfig

FRONT_DOORS = {"federate", "serve", "simulate", "compute_epsilon", "solve_noise_multiplier", "build_report",
               "load_ledger", "save_initial_model", "make_dp_compatible"}


def test_all_lists_every_front_door_and_each_resolves_to_a_callable() -> None:
    assert set(fedveil.__all__) == FRONT_DOORS
    for name in fedveil.__all__:
        value = getattr(fedveil, name)
        assert callable(value), name
        assert inspect.getdoc(value), f"{name} has no docstring"
    listed = dir(fedveil)
    assert FRONT_DOORS <= set(listed) and listed == sorted(listed)
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        _ = fedveil.nonesuch  # type: ignore[attr-defined]


def test_dir_lists_the_front_doors_and_import_stays_light_in_a_fresh_interpreter() -> None:
    code = ("import sys, json, fedveil; d = dir(fedveil); "
            "print(json.dumps({'dir': d, 'heavy': sorted(m for m in ('torch', 'grpc', 'opacus', 'numpy') "
            "if m in sys.modules)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    seen = json.loads(out.stdout)
    assert FRONT_DOORS <= set(seen["dir"])
    assert seen["heavy"] == [], f"import fedveil loaded {seen['heavy']}"


def test_the_cli_builds_its_commands_without_torch_or_grpc() -> None:
    """``fedveil --help`` (and every command's parsing) must not pay torch's 1.5 s import: command
    modules import torch, grpc and opacus inside the commands that use them."""
    code = ("import sys, json; from fedveil.cli import build_cli; build_cli(); "
            "print(json.dumps(sorted(m for m in ('torch', 'grpc', 'opacus') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == [], f"building the CLI loaded {out.stdout.strip()}"


@pytest.mark.slow
def test_budget_front_doors_need_only_the_privacy_parameters() -> None:
    eps = fedveil.compute_epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=10_000, delta=1e-5)
    assert eps == pytest.approx(5.632, abs=0.01)  # the RDP figure the docs quote
    sol = fedveil.solve_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000)
    assert 3.0 * 0.995 <= sol.epsilon <= 3.0


def test_load_ledger_reads_a_ledger_file_and_build_report_accounts_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger(LedgerConfig(accountant="rdp", federation_delta=1e-5, client_delta=1e-5))
    for r in range(1, 4):
        ledger.reserve(r, federation=SubsampledGaussianEvent(1.0, 1.0), mechanism="central")
    path = tmp_path / "ledger.json"
    path.write_text(ledger.to_json())
    report = fedveil.build_report(fedveil.load_ledger(path))
    assert len(report.rounds) == 3
    assert report.federation_epsilon == pytest.approx(ledger.epsilon("federation"))
    with pytest.raises(FrontDoorError) as err:
        fedveil.load_ledger(path, run="r1")
    assert err.value.field == "run"
    with pytest.raises(FrontDoorError) as err:
        fedveil.load_ledger(tmp_path / "missing.json")
    assert err.value.field == "path"


def test_simulate_defaults_to_a_small_job_and_matches_the_command_bit_for_bit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fedveil.simulate(3, 2, seed=4, insecure_deterministic=True)
    assert result.summary["status"] == "completed" and not result.client_errors
    assert [r.survivors for r in result.rounds] == [3, 3]
    # the same job through `fedveil simulate`, which keeps its store for us to read the aggregates back
    store = tmp_path / "cli.sqlite"
    code = main(["simulate", "--clients", "3", "--rounds", "2", "--seed", "4", "--insecure-deterministic",
                 "--store", str(store)])
    assert code == 0
    from fedveil.simulation.host import read_rounds

    run_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]["run_id"]
    cli_rounds = read_rounds(store, run_id)
    for mine, theirs in zip(result.rounds, cli_rounds, strict=True):
        assert mine.aggregate is not None and theirs.aggregate is not None
        np.testing.assert_array_equal(mine.aggregate, theirs.aggregate)


def test_simulate_with_central_dp_leaves_a_ledger_that_the_budget_doors_read(tmp_path: Path) -> None:
    store = tmp_path / "run.sqlite"
    result = fedveil.simulate(3, 1, dp="central", store=store, dp_noise_multiplier=1.0)
    assert result.summary["status"] == "completed"
    report = fedveil.build_report(fedveil.load_ledger(store))
    assert report.federation_epsilon is not None and report.federation_epsilon > 0
    assert report.federation_epsilon == pytest.approx(result.summary["epsilon"], rel=1e-6)
    with pytest.raises(FrontDoorError) as err:
        fedveil.simulate(3, 1, store=store)  # refuses to overwrite a kept store
    assert err.value.field == "store"


@pytest.mark.parametrize(("kwargs", "field"), [({"clients": 1}, "clients"), ({"rounds": 0}, "rounds")])
def test_simulate_names_the_bad_argument(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(FrontDoorError) as err:
        fedveil.simulate(**kwargs)
    assert err.value.field == field and isinstance(err.value, ValueError)


def test_serve_requires_tls_or_an_explicit_loopback_opt_out(tmp_path: Path) -> None:
    config = ServerConfig.from_flat(task="fedveil.tasks.synthetic", rounds=1, clients_per_round=2, min_clients=2)
    store = tmp_path / "run.db"
    with pytest.raises(FrontDoorError) as err:
        fedveil.serve(config, store=store)
    assert err.value.field == "tls_cert"
    with pytest.raises(FrontDoorError) as err:
        fedveil.serve(config, store=store, listen="0.0.0.0:7000", insecure=True)
    assert err.value.field == "insecure" and "loopback" in str(err.value)
    with pytest.raises(FrontDoorError) as err:
        fedveil.serve(config, store=store, insecure=True, tls_cert="a.pem")
    assert err.value.field == "insecure"
    assert not store.exists()  # refused before anything was created


@pytest.mark.slow
def test_serve_runs_a_job_over_tls_with_the_pinned_authority(tmp_path: Path) -> None:
    """The operator's front door end to end: TLS files, the authority file and the task named in the config
    are all it needs; three sites that pin the authority complete the job over real gRPC."""
    import threading

    from fedveil.clients import federate, run_client
    from fedveil.clients.api import evaluator
    from fedveil.protocol.tls import generate_ca, generate_certificate
    from fedveil.server.store import RunStore
    from fedveil.simulation.processes import free_port
    from fedveil.tasks.synthetic import task
    from tests.identity_helpers import secure_federate, write_authority

    ca = generate_ca("hub CA")
    leaf = generate_certificate("hub", ca, hostnames=["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    leaf.write(tmp_path / "hub.pem", tmp_path / "hub.key")
    authority = write_authority(tmp_path / "authority.pub")
    store = tmp_path / "run.db"
    with RunStore(store) as rs:
        tokens = [rs.enroll(f"site-{i}").token for i in range(3)]
    address = f"127.0.0.1:{free_port()}"
    config = ServerConfig.from_flat(task="fedveil.tasks.synthetic", rounds=2, clients_per_round=3, min_clients=3,
                                    seed=2,
                          cohort_wait=1.0, linger=1.0, poll_wait=1.0)
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["summary"] = fedveil.serve(config, store=store, listen=address, tls_cert=tmp_path / "hub.pem",
                                           tls_key=tmp_path / "hub.key", authority=authority)
        except BaseException as err:  # surfaced below
            out["error"] = err

    server = threading.Thread(target=run, daemon=True)
    server.start()
    assert task.synthetic_data is not None
    sites = []
    for i in range(3):
        data = task.synthetic_data(i, 3, 2)
        fed = federate(address, task=task, token=tokens[i], ca_cert=tmp_path / "ca.pem", seed=i,
                       num_examples=len(data), evaluate=evaluator(task, data), **secure_federate(f"site-{i}"))
        site = threading.Thread(target=run_client, args=(fed, task, data), daemon=True)
        site.start()
        sites.append(site)
    server.join(timeout=120)
    assert not server.is_alive() and "error" not in out, out.get("error")
    summary = out["summary"]
    assert getattr(summary, "status") == "completed" and getattr(summary, "completed_rounds") == 2
    for site in sites:
        site.join(timeout=30)
    from tests.identity_helpers import TEST_AUTHORITY
    from tests.server_helpers import read_store

    [(config_json,)] = read_store(store, "SELECT config_json FROM runs")
    recorded = json.loads(config_json)  # the job ran with the authority the file pins, announced to the sites
    assert recorded["authority_public_key"] == TEST_AUTHORITY.public_key.raw.hex()
    assert recorded["consortium"] == TEST_AUTHORITY.consortium


def test_serve_refuses_revocations_without_the_authority(tmp_path: Path) -> None:
    config = ServerConfig.from_flat(task="fedveil.tasks.synthetic", rounds=1, clients_per_round=2, min_clients=2)
    with pytest.raises(FrontDoorError) as err:
        fedveil.serve(config, store=tmp_path / "run.db", insecure=True, revocations=tmp_path / "rev.bin")
    assert err.value.field == "revocations"
