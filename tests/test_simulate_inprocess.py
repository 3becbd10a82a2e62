from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedveil.cli import main
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import SimulatedSites, client_seed, simulate_in_process
from tests.identity_helpers import secure_job, site_policy

torch.set_num_threads(1)


def config(**kw: object) -> ServerConfig:
    base: dict = dict(task="fedveil.tasks.synthetic", rounds=3, clients_per_round=4, min_clients=3, seed=5,
                      cohort_wait=1.0, linger=0.5, poll_wait=1.0, round_timeout=60.0, stage_timeout=30.0)
    base.update(kw)
    return ServerConfig.from_flat(**base)


@pytest.mark.slow
def test_same_seed_same_aggregates_other_seed_other_aggregates() -> None:
    # bit-for-bit reproducible only with insecure_deterministic: by default the rounding comes from the OS
    a = simulate_in_process(config(insecure_deterministic=True), 4)
    b = simulate_in_process(config(insecure_deterministic=True), 4)
    c = simulate_in_process(config(seed=6, insecure_deterministic=True), 4)
    assert a.summary["status"] == "completed" and not a.client_errors
    # three training rounds, then the final evaluation (an evaluation-only round 4, secure sums)
    assert a.client_histories == {f"client-{i:03d}": ["completed"] * 4 for i in range(4)}
    assert [r.survivors for r in a.rounds] == [4, 4, 4]
    for ra, rb, rc in zip(a.rounds, b.rounds, c.rounds, strict=True):
        np.testing.assert_array_equal(ra.aggregate, rb.aggregate)
        assert not np.array_equal(ra.aggregate, rc.aggregate)
    # FedAvg of well-behaved clients: the model improves and the updates shrink
    assert a.summary["final_metrics"]["accuracy"] > 0.75
    norms = [r.stats["update_norm"] for r in a.rounds]
    assert norms[-1] < norms[0]


def test_the_seed_alone_fixes_the_data_order_not_the_rounding() -> None:
    """The secure default: a server that knows the job seed cannot predict a site's stochastic rounding
    (or keys, masks, noise), so two runs with the same seed release different low-order bits."""
    a = simulate_in_process(config(rounds=1), 4)
    b = simulate_in_process(config(rounds=1), 4)
    assert a.summary["status"] == b.summary["status"] == "completed"
    ra, rb = a.rounds[0].aggregate, b.rounds[0].aggregate
    assert ra is not None and rb is not None and not np.array_equal(ra, rb)
    np.testing.assert_allclose(ra, rb, atol=1e-3)  # the same training: only the rounding differs


@pytest.mark.parametrize("dp", ["central", "distributed"])
def test_user_level_dp_modes_run_with_real_clients(dp: str) -> None:
    result = simulate_in_process(config(rounds=2, dp=dp, dp_noise_multiplier=0.5, dp_clip=0.5), 4)
    assert result.summary["status"] == "completed" and not result.client_errors
    assert result.summary["epsilon"] is not None and result.summary["epsilon"] > 0
    for rnd in result.rounds:
        assert rnd.stats["update_norm"] > 0


@pytest.mark.slow
def test_fedadam_server_optimizer_in_a_simulation() -> None:
    result = simulate_in_process(config(rounds=2, optimizer="fedadam", server_lr=0.05), 3)
    assert result.summary["status"] == "completed"
    assert result.rounds[0].aggregate is not None


def test_simulated_sites_accept_their_own_jobs_cohort_and_colluding_fraction(tmp_path: Path) -> None:
    """A simulation of 2 clients (the CLI allows it) once had every site decline the cohort of 2 (its
    default minimum is 3), and ``--processes --max-corrupt-fraction 0.1`` had the site processes decline
    a round the threads accepted: threads and processes now get the same policy, from the job."""
    two = simulate_in_process(config(rounds=1, clients_per_round=2, min_clients=2), 2)
    assert two.summary["status"] == "completed"
    assert two.client_histories == {f"client-{i:03d}": ["completed"] * 2 for i in range(2)}
    names = ["client-000", "client-001"]
    sites = SimulatedSites.create(config(clients_per_round=2, min_clients=2, max_corrupt_fraction=0.1), names)
    policy = sites.policy()
    assert (policy.min_cohort, policy.max_corrupt_fraction, policy.trust_server) == (2, 0.1, False)
    flags = sites.write_files(tmp_path)
    for name in names:
        assert flags[name][-4:] == ["--max-corrupt-fraction", "0.1", "--min-cohort", "2"]
    passive = SimulatedSites.create(config(active_adversary=False), names)
    assert passive.policy().trust_server and passive.policy().min_cohort == 3  # min_clients 3: the default stays
    assert passive.write_files(tmp_path)["client-000"][0] == "--trust-server"


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


def test_an_infinite_epsilon_is_null_in_the_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Review of 2026-12-07: z = 0 printed "epsilon": Infinity, which is not JSON (jq read it as 1.8e308)."""
    code = main(["simulate", "--clients", "3", "--rounds", "1", "--seed", "1", "--dp", "central",
                 "--noise-multiplier", "0"])
    assert code == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=refuse)
    assert payload["summary"]["epsilon"] is None


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
        # the config names the server's flags; simulate's own names for them are shown
        (["--clients", "3", "--rounds", "1", "--dp", "central", "--clip", "-1"], "error: --clip: must be a positive"),
        (["--clients", "3", "--rounds", "1", "--dp", "central", "--noise-multiplier", "nan"],
         "error: --noise-multiplier:"),
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
    # active is the default now: compare with an explicitly passive job; the same bits need insecure_deterministic
    plain = simulate_in_process(config(rounds=2, active_adversary=False, insecure_deterministic=True), 4)
    active = simulate_in_process(config(rounds=2, active_adversary=True, insecure_deterministic=True), 4)
    assert plain.summary["status"] == "completed" and not plain.client_errors
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
        coordinator = Coordinator(config(**secure_job(active_adversary=True)), task, store, new_run=True)
        # the site pins the authority (the secure default) but has no identity key: the server refuses its Join
        fed = federate(task=task, transport=InProcessTransport(coordinator, "site-0"), policy=site_policy())
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


@pytest.mark.slow
def test_harary_graph_rounds_complete_and_match_the_complete_graph_sum() -> None:
    # degree 4 on 8 clients is a real sparse SecAgg+ graph (not the complete-graph fallback)
    # (the same bits need insecure_deterministic: by default the rounding comes from the OS)
    sparse = simulate_in_process(config(rounds=1, clients_per_round=8, min_clients=8, secagg="harary",
                                        secagg_degree=4, insecure_deterministic=True), 8)
    dense = simulate_in_process(config(rounds=1, clients_per_round=8, min_clients=8, insecure_deterministic=True), 8)
    assert sparse.summary["status"] == "completed" and not sparse.client_errors
    assert sparse.rounds[0].survivors == 8
    np.testing.assert_array_equal(sparse.rounds[0].aggregate, dense.rounds[0].aggregate)


def test_a_harary_job_too_small_for_a_sparse_graph_runs_on_the_complete_graph() -> None:
    # no degree given: the library derives one, and for 6 sites none is sparse, so rounds use the
    # complete graph; the sites must accept that (it is never weaker) instead of declining every round
    run = simulate_in_process(config(rounds=1, clients_per_round=6, min_clients=6, secagg="harary",
                                     insecure_deterministic=True), 6)
    assert run.summary["status"] == "completed" and not run.client_errors
    assert run.rounds[0].survivors == 6


def test_client_failures_that_leave_too_few_clients_stop_the_job_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from fedveil.simulation import backends as simulation

    def fake_run_client(fed: object, task: object, data: object, *,
                        leave_round_on: tuple[type[Exception], ...] = ()) -> list[object]:
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


def test_a_site_whose_client_fails_mid_round_is_out_of_it_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """The simulation's driver sees a site's client thread fail, as the Ray driver sees a worker die: it
    tells the coordinator, and the round goes on without the site instead of waiting out the stage's
    deadline (two minutes here) for a message that cannot come."""
    from fedveil.protocol.transport import InProcessTransport
    from fedveil.server.store import RunStore
    from fedveil.simulation import backends as simulation

    class CrashesAtShareKeys(InProcessTransport):
        """client-003's process dies as it sends its share boxes: no call of it reaches the server again."""

        def __init__(self, service: Any, name: str) -> None:
            super().__init__(service, name)
            if name == "client-003":
                for rpc in [n for n, v in vars(InProcessTransport).items() if callable(v) and not n.startswith("_")]:
                    setattr(self, rpc, self._dead_after_share_keys(rpc, getattr(self, rpc)))
            self.dead = False

        def _dead_after_share_keys(self, rpc: str, call: Any) -> Any:
            def crash_or_send(*args: Any) -> Any:
                self.dead = self.dead or rpc == "share_keys"
                if self.dead:
                    raise RuntimeError("site process crashed")
                return call(*args)
            return crash_or_send

    monkeypatch.setattr(simulation, "InProcessTransport", CrashesAtShareKeys)
    result = simulate_in_process(config(rounds=1, stage_timeout=120.0, final_evaluation=False), 4,
                                 store_path=tmp_path / "run.sqlite")
    assert result.summary["status"] == "completed", result.summary
    assert result.client_errors == {"client-003": "RuntimeError: site process crashed"}
    assert [r.survivors for r in result.rounds] == [3]
    with RunStore(tmp_path / "run.sqlite") as store:
        drops = store.dropouts(result.summary["run_id"])
    assert drops == [(1, 1, "client-003", "share-keys",
                      "its session ended: its client failed: RuntimeError: site process crashed")], drops


def test_sites_sharing_a_process_run_numpys_blas_at_one_thread_and_its_size_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # many site threads each calling a multi-threaded OpenBLAS made every call spin for the cores
    # (fedveil.simulation.site_threads); the pools are process-wide, so the size is restored after,
    # and torch's OpenMP threads (--threads) are not touched
    from threadpoolctl import threadpool_info, threadpool_limits

    from fedveil.simulation import backends as simulation

    def sizes(api: str) -> set[int]:
        return {int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == api}

    seen: dict[str, set[int]] = {}

    def fake_run_client(fed: str, task: object, data: object, *,
                        leave_round_on: tuple[type[Exception], ...] = ()) -> list[object]:
        seen[fed] = sizes("blas")
        return []

    monkeypatch.setattr(simulation, "run_client", fake_run_client)
    clients = [simulation.ThreadedClient(n, n, None) for n in ("a", "b")]  # type: ignore[arg-type]
    with threadpool_limits(limits=2):  # as on a 2-core machine, whatever this one has
        openmp = sizes("openmp")
        assert sizes("blas") == {2}
        result, _, errors = simulation.run_with_client_threads(  # the job runs in this thread
            lambda: (sizes("blas"), sizes("openmp")), lambda: None, None, clients,  # type: ignore[arg-type]
            join_timeout_s=5)
        assert sizes("blas") == {2}
    assert result == ({1}, openmp) and seen == {"a": {1}, "b": {1}} and errors == {}


def test_every_member_gets_the_same_advertised_keys_and_the_server_builds_them_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The share-keys list (n entries, the same for every member) is built once per round, not once per
    member's poll: n identity-key lookups per round, not n²; each member still gets the full list."""
    from fedveil.clients.secagg_driver import SecAggClientDriver
    from fedveil.server.coordinator.rounds import RoundDriverMixin

    lookups: list[int] = []
    received: dict[int, set[bytes]] = {}
    real_lookup = RoundDriverMixin._member_identity_key
    real_share_keys = SecAggClientDriver.share_keys

    def counting_lookup(self: Any, rnd: Any, sid: int) -> bytes:
        lookups.append(rnd.number)
        return real_lookup(self, rnd, sid)

    def recording_share_keys(self: Any, peer_keys: Any) -> Any:
        received.setdefault(self.round_id, set()).add(peer_keys.SerializeToString())
        return real_share_keys(self, peer_keys)

    monkeypatch.setattr(RoundDriverMixin, "_member_identity_key", counting_lookup)
    monkeypatch.setattr(SecAggClientDriver, "share_keys", recording_share_keys)
    result = simulate_in_process(config(rounds=2, clients_per_round=5, active_adversary=True), 5)
    assert result.summary["status"] == "completed" and not result.client_errors
    assert [r.survivors for r in result.rounds] == [5, 5]
    per_round = {number: lookups.count(number) for number in set(lookups)}
    assert per_round and all(count == 5 for count in per_round.values()), per_round
    assert all(len(lists) == 1 for lists in received.values()), {r: len(v) for r, v in received.items()}


@pytest.mark.parametrize("active", [True, False])
def test_every_member_gets_the_same_unmasking_request_and_the_server_builds_it_once(
        monkeypatch: pytest.MonkeyPatch, active: bool) -> None:
    """The unmasking request (survivors, dropped and, in active mode, every survivor's signature:
    n entries, the same for every member) and the survivor check are built once per round: each
    member after the first is answered from the cache, and all get the same bytes."""
    from fedveil.clients.secagg_driver import SecAggClientDriver
    from fedveil.server.coordinator import rounds

    verdicts: list[bool] = []
    received: dict[str, dict[int, set[bytes]]] = {"unmask": {}, "check": {}}
    real_same = rounds._same_unmasking
    real_unmask, real_confirm = SecAggClientDriver.unmask, SecAggClientDriver.confirm_survivors

    def counting_same(a: Any, b: Any) -> bool:
        verdicts.append(real_same(a, b))
        return verdicts[-1]

    def recording_unmask(self: Any, request: Any) -> Any:
        received["unmask"].setdefault(self.round_id, set()).add(request.SerializeToString())
        return real_unmask(self, request)

    def recording_confirm(self: Any, check: Any) -> Any:
        received["check"].setdefault(self.round_id, set()).add(check.SerializeToString())
        return real_confirm(self, check)

    monkeypatch.setattr(rounds, "_same_unmasking", counting_same)
    monkeypatch.setattr(SecAggClientDriver, "unmask", recording_unmask)
    monkeypatch.setattr(SecAggClientDriver, "confirm_survivors", recording_confirm)
    result = simulate_in_process(config(rounds=2, clients_per_round=5, active_adversary=active), 5)
    assert result.summary["status"] == "completed" and not result.client_errors
    aggregations = len(received["unmask"])  # the 2 rounds and the final evaluation's secure sum
    assert aggregations >= 2 and all(len(kinds) == 1 for kinds in received["unmask"].values())
    assert len(received["check"]) == (aggregations if active else 0)
    assert all(len(kinds) == 1 for kinds in received["check"].values())
    # every member after the first is served from the cache: no rebuild in any aggregation
    assert verdicts and all(verdicts) and len(verdicts) == aggregations * (5 - 1)


def test_every_member_gets_the_same_roster_with_its_own_slot_and_the_server_builds_it_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The RoundStart (n identity keys and credentials, the same for every member) is built once per
    round and sent with each member's own slot: n² roster entries per round were built under the
    coordinator's lock when each member's poll built its own."""
    from fedveil.server.coordinator.rounds import RoundDriverMixin

    built: list[int] = []
    sent: dict[int, list[pb.RoundStart]] = {}
    real_build = RoundDriverMixin._round_start
    real_member = RoundDriverMixin._member_round_start

    def counting_build(self: Any, rnd: Any) -> pb.RoundStart:
        built.append(rnd.number)
        return real_build(self, rnd)

    def recording_member(self: Any, rnd: Any, sid: int) -> pb.RoundStart:
        start = real_member(self, rnd, sid)
        sent.setdefault(rnd.number, []).append(start)
        return start

    monkeypatch.setattr(RoundDriverMixin, "_round_start", counting_build)
    monkeypatch.setattr(RoundDriverMixin, "_member_round_start", recording_member)
    result = simulate_in_process(config(rounds=2, clients_per_round=5, active_adversary=True), 5)
    assert result.summary["status"] == "completed" and not result.client_errors
    assert {1, 2} <= set(sent) and sorted(built) == sorted(sent)  # once per round (and the final evaluation)
    for starts in sent.values():
        assert sorted({s.client_id for s in starts}) == [0, 1, 2, 3, 4]
        rosters = set()
        for start in starts:
            assert len(start.secagg.identity_keys) == 5 and len(start.secagg.identity_credentials) == 5
            without_slot = pb.RoundStart()
            without_slot.CopyFrom(start)
            without_slot.client_id = 0
            rosters.add(without_slot.SerializeToString(deterministic=True))
        assert len(rosters) == 1
