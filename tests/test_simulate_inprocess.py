from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedveil.cli import main
from fedveil.clients.simulation import client_seed, simulate_in_process
from fedveil.server.config import ServerConfig
from fedveil.server.simulation import CoordinatorHost

torch.set_num_threads(1)


def config(**kw: object) -> ServerConfig:
    base: dict = dict(task="fedveil.tasks.synthetic", rounds=3, clients_per_round=4, min_clients=3, seed=5,
                      cohort_wait=1.0, linger=0.5, poll_wait=1.0, round_timeout=60.0, stage_timeout=30.0)
    base.update(kw)
    return ServerConfig(**base)


def test_same_seed_same_aggregates_other_seed_other_aggregates() -> None:
    a = simulate_in_process(config(), 4, host=CoordinatorHost())
    b = simulate_in_process(config(), 4, host=CoordinatorHost())
    c = simulate_in_process(config(seed=6), 4, host=CoordinatorHost())
    assert a.summary["status"] == "completed" and not a.client_errors
    assert a.client_histories == {f"client-{i:03d}": ["completed"] * 3 for i in range(4)}
    assert [r.survivors for r in a.rounds] == [4, 4, 4]
    for ra, rb, rc in zip(a.rounds, b.rounds, c.rounds, strict=True):
        np.testing.assert_array_equal(ra.aggregate, rb.aggregate)
        assert not np.array_equal(ra.aggregate, rc.aggregate)
    # FedAvg of well-behaved clients: the model improves and the updates shrink
    assert a.summary["final_metrics"]["accuracy"] > 0.75
    norms = [r.stats["update_norm"] for r in a.rounds]
    assert norms[-1] < norms[0]


@pytest.mark.parametrize("dp", ["central", "distributed"])
def test_user_level_dp_modes_run_with_real_clients(dp: str) -> None:
    result = simulate_in_process(config(rounds=2, dp=dp, dp_noise_multiplier=0.5, dp_clip=0.5), 4,
                                 host=CoordinatorHost())
    assert result.summary["status"] == "completed" and not result.client_errors
    assert result.summary["epsilon"] is not None and result.summary["epsilon"] > 0
    for rnd in result.rounds:
        assert rnd.stats["update_norm"] > 0


def test_fedadam_server_optimizer_in_a_simulation() -> None:
    result = simulate_in_process(config(rounds=2, optimizer="fedadam", server_lr=0.05), 3, host=CoordinatorHost())
    assert result.summary["status"] == "completed"
    assert result.rounds[0].aggregate is not None


def test_client_seeds_differ_per_client_and_are_stable() -> None:
    assert client_seed(1, 0) == client_seed(1, 0)
    assert len({client_seed(1, i) for i in range(50)}) == 50
    assert client_seed(1, 0) != client_seed(2, 0)


def test_cli_simulate_prints_rounds_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = tmp_path / "sim.sqlite"
    code = main(["simulate", "--clients", "3", "--rounds", "2", "--seed", "1", "--store", str(store)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[1].startswith("round 1: 3 survivors")
    payload = json.loads(out[-1])
    assert payload["summary"]["completed_rounds"] == 2 and payload["mode"] == "in-process"
    assert store.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "1", "--rounds", "2"], "error: --clients: must be at least 2"),
        (["--clients", "3", "--rounds", "0"], "error: --rounds: must be at least 1"),
        (["--clients", "3", "--rounds", "1", "--clients-per-round", "5"], "error: --clients-per-round:"),
        (["--clients", "3", "--rounds", "1", "--task", "no.such.module"], "error: --task: cannot import"),
        (["--clients", "3", "--rounds", "1", "--task", "fedveil.task:load_task"], "error: --task: 'load_task' is a"),
        (["--clients", "3", "--rounds", "1", "--task", "fedveil.tasks.synthetic:N_FEATURES"], "error: --task:"),
        (["--clients", "3", "--rounds", "1", "--server-lr", "-1"], "error: --server-lr:"),
        (["--clients", "3", "--rounds", "1", "--store", "/nonexistent-dir/run.db"],
         "error: --store: directory '/nonexistent-dir' does not exist"),
    ],
)
def test_cli_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code = main(["simulate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(message), err


def test_active_adversary_mode_signs_and_checks_and_releases_the_same_sum() -> None:
    plain = simulate_in_process(config(rounds=2), 4, host=CoordinatorHost())
    active = simulate_in_process(config(rounds=2, active_adversary=True), 4, host=CoordinatorHost())
    assert active.summary["status"] == "completed" and not active.client_errors
    for a, b in zip(plain.rounds, active.rounds, strict=True):
        np.testing.assert_array_equal(a.aggregate, b.aggregate)


def test_active_adversary_job_refuses_a_client_without_identity_key(tmp_path: Path) -> None:
    from fedveil.clients import ClientError, federate
    from fedveil.protocol.transport import InProcessTransport
    from fedveil.server.coordinator import Coordinator
    from fedveil.server.store import RunStore
    from fedveil.tasks.synthetic import task

    with RunStore(tmp_path / "run.sqlite") as store:
        coordinator = Coordinator(config(active_adversary=True), task, store, new_run=True)
        fed = federate(task=task, transport=InProcessTransport(coordinator, "site-0"))
        with pytest.raises(ClientError, match="active-adversary mode"):
            next(iter(fed))


def test_identity_key_files(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedveil.clients.api import load_identity_key

    def pem(key: object) -> bytes:
        return key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    good = Ed25519PrivateKey.generate()
    (tmp_path / "id.pem").write_bytes(pem(good))
    loaded = load_identity_key(tmp_path / "id.pem")
    assert loaded.public_key().public_bytes_raw() == good.public_key().public_bytes_raw()
    (tmp_path / "x.pem").write_bytes(pem(X25519PrivateKey.generate()))
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        load_identity_key(tmp_path / "x.pem")
    with pytest.raises(ValueError, match="cannot read"):
        load_identity_key(tmp_path / "missing.pem")


def test_harary_graph_rounds_complete_and_match_the_complete_graph_sum() -> None:
    # degree 4 on 8 clients is a real sparse SecAgg+ graph (not the complete-graph fallback)
    sparse = simulate_in_process(config(rounds=1, clients_per_round=8, min_clients=8, secagg="harary",
                                        secagg_degree=4), 8, host=CoordinatorHost())
    dense = simulate_in_process(config(rounds=1, clients_per_round=8, min_clients=8), 8, host=CoordinatorHost())
    assert sparse.summary["status"] == "completed" and not sparse.client_errors
    assert sparse.rounds[0].survivors == 8
    np.testing.assert_array_equal(sparse.rounds[0].aggregate, dense.rounds[0].aggregate)


def test_client_failures_that_leave_too_few_clients_stop_the_job_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from fedveil.clients import simulation

    def fake_run_client(fed: object, task: object, data: object) -> list[object]:
        if fed == "broken":
            raise RuntimeError("local data unusable")
        stopped.wait(10)
        return []

    monkeypatch.setattr(simulation, "run_client", fake_run_client)
    stopped = threading.Event()
    clients = [simulation.ThreadedClient(n, f, None) for n, f in  # type: ignore[arg-type]
               (("a", "ok"), ("b", "broken"), ("c", "ok"))]

    def job() -> str:
        return "stopped" if stopped.wait(10) else "hung"

    result, _, errors = simulation.run_with_client_threads(job, stopped.set, None, clients,  # type: ignore[arg-type]
                                                           join_timeout_s=5, min_live_clients=3)
    assert result == "stopped" and errors == {"b": "RuntimeError: local data unusable"}
    # with enough clients left, one failure is only a dropout: the job is not stopped
    stopped.clear()
    stop_calls: list[bool] = []
    done = threading.Timer(0.5, stopped.set)  # the job ends on its own
    done.start()
    result, _, errors = simulation.run_with_client_threads(
        job, lambda: stop_calls.append(stopped.is_set()), None, clients, join_timeout_s=5,  # type: ignore[arg-type]
        min_live_clients=2,
    )
    done.join()
    assert set(errors) == {"b"} and stop_calls == [True]  # only the usual stop after the job ended on its own
