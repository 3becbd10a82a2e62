"""The PyTorch-loop API: a user's own training loop joins a federation with a few changed lines.

The server is the real ``fedveil server`` code (``fedveil.server.runner.serve``: coordinator,
gRPC service, token auth) on a loopback port in a background thread; the other sites are
turnkey clients; the user's loop runs in the test's thread, over real gRPC.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fedveil
from fedveil.clients import federate, run_client
from fedveil.clients.api import evaluator
from fedveil.clients.backoff import BackoffPolicy, GaveUp
from fedveil.model_spec import ModelMismatchError
from fedveil.protocol.tls import generate_ca, generate_certificate
from fedveil.protocol.transport import InProcessTransport
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator
from fedveil.server.runner import TlsSettings, serve
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task
from tests.identity_helpers import secure_federate, secure_job

torch.set_num_threads(1)
TASK = "fedveil.tasks.synthetic"
SEED = 3


def job(rounds: int, **kw: object) -> ServerConfig:
    return ServerConfig.from_flat(task=TASK, rounds=rounds, clients_per_round=3, min_clients=3, seed=SEED,
                                  cohort_wait=1.0, linger=10.0, poll_wait=1.0, round_timeout=120.0, stage_timeout=60.0,
                        **secure_job(**kw))  # type: ignore[arg-type]


def start_server(
    config: ServerConfig, tmp_path: Path, tls: TlsSettings | None = None
) -> tuple[str, list[str], threading.Thread, dict]:
    store_path = tmp_path / "run.sqlite"
    with RunStore(store_path) as store:
        tokens = [store.enroll(f"site-{i}").token for i in range(3)]
    port_file = tmp_path / "port"
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = serve(config, task, store_path, "127.0.0.1:0", tls=tls, port_file=port_file,
                                   install_signal_handlers=False)
        except BaseException as err:  # surfaced below
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline and "error" not in out, out.get("error")
        time.sleep(0.05)
    return f"127.0.0.1:{int(port_file.read_text())}", tokens, thread, out


def start_turnkey(address: str, token: str, index: int) -> threading.Thread:
    assert task.synthetic_data is not None
    data = task.synthetic_data(index, 3, SEED)
    fed = federate(address, task=task, token=token, insecure=True, seed=100 + index, num_examples=len(data),
                   evaluate=evaluator(task, data), **secure_federate(f"site-{index}"))
    thread = threading.Thread(target=run_client, args=(fed, task, data), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_an_existing_pytorch_loop_joins_over_grpc_and_the_global_model_learns(tmp_path: Path) -> None:
    address, tokens, server, out = start_server(job(rounds=4), tmp_path)
    helpers = [start_turnkey(address, tokens[i], i) for i in (1, 2)]

    # --- the user's code: their own model, data loader, optimizer and loop -------------------
    assert task.synthetic_data is not None
    dataset = task.synthetic_data(0, 3, SEED)
    features, labels = dataset.tensors
    model = nn.Sequential(nn.Linear(10, 1))
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    global_losses, accuracies, outcomes = [], [], []
    for rnd in fedveil.federate(address, task=TASK, token=tokens[0], insecure=True, model=model, seed=1,
                                **secure_federate("site-0")):
        with torch.no_grad():  # how good is the global model we just received, on our data?
            logits = model(features).squeeze(-1)
            global_losses.append(float(loss_fn(logits, labels)))
            accuracies.append(float(((logits > 0).float() == labels).float().mean()))
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x).squeeze(-1), y).backward()
            optimizer.step()
        outcomes.append(rnd.submit(model).outcome)
    # ------------------------------------------------------------------------------------------

    server.join(timeout=120)
    for h in helpers:
        h.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert out["summary"].status == "completed" and out["summary"].completed_rounds == 4
    assert outcomes == ["completed"] * 4
    assert global_losses[-1] < global_losses[0] - 0.05, global_losses
    assert accuracies[-1] > accuracies[0], accuracies


def start_job_with_two_turnkey_sites(
    tmp_path: Path, config: ServerConfig
) -> tuple[Coordinator, RunStore, threading.Thread, list[threading.Thread]]:
    """The coordinator running ``config`` in a thread, and sites 1 and 2 as turnkey clients; site 0 is the test's."""
    store = RunStore(tmp_path / "run.sqlite")
    coordinator = Coordinator(config, task, store, new_run=True)
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    helpers = []

    def helper(fed: fedveil.clients.Federation, data: Any) -> None:
        with contextlib.suppress(GaveUp):  # the tests that stop the job early leave the helpers to give up
            run_client(fed, task, data)

    for i in (1, 2):
        assert task.synthetic_data is not None
        data = task.synthetic_data(i, 3, SEED)
        fed = federate(task=task, transport=InProcessTransport(coordinator, f"site-{i}"), seed=i, num_examples=200,
                       backoff=BackoffPolicy(initial_delay_s=0.1, max_delay_s=0.5, give_up_after_s=10.0),
                       **secure_federate(f"site-{i}"))
        helpers.append(threading.Thread(target=helper, args=(fed, data), daemon=True))
        helpers[-1].start()
    return coordinator, store, driver, helpers


@pytest.mark.slow
def test_rnd_privatize_wraps_the_users_objects_for_local_dp_and_the_client_accounts_its_epsilon(
    tmp_path: Path,
) -> None:
    config = job(rounds=2, dp="local", dp_local_noise_multiplier=1.0, dp_local_max_grad_norm=1.0)
    coordinator, store, driver, helpers = start_job_with_two_turnkey_sites(tmp_path, config)

    assert task.synthetic_data is not None
    dataset = task.synthetic_data(0, 3, SEED)
    model = nn.Sequential(nn.Linear(10, 1))
    loader = DataLoader(dataset, batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    federation = federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"), model=model, seed=9,
                          **secure_federate("site-0"))
    epsilons, kinds = [], []
    for rnd in federation:
        model, optimizer, loader = rnd.privatize(model, optimizer, loader)  # names rebound, as in the README
        kinds.append((type(model).__name__, type(optimizer).__name__))
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad()
            loss_fn(model(x).squeeze(-1), y).backward()
            optimizer.step()
        assert rnd.submit(model).outcome == "completed"
        spend = federation.local_privacy
        assert spend is not None
        epsilons.append(spend.epsilon)
    driver.join(timeout=60)
    for h in helpers:
        h.join(timeout=60)
    store.close()
    assert kinds == [("GradSampleModule", "DPOptimizer")] * 2
    assert 0 < epsilons[0] < epsilons[1]


def test_local_dp_job_refuses_an_update_trained_without_privatize(tmp_path: Path) -> None:
    config = job(rounds=1, dp="local")
    coordinator, store, driver, _ = start_job_with_two_turnkey_sites(tmp_path, config)
    with pytest.raises(fedveil.clients.ClientError, match=r"call rnd\.privatize"):
        for rnd in federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"),
                            **secure_federate("site-0")):
            rnd.submit(rnd.model)
    coordinator.stop()
    driver.join(timeout=30)
    store.close()


def declined_alone(federation: fedveil.clients.Federation, coordinator: Coordinator, driver: threading.Thread,
                   store: RunStore, outcomes: list[Any]) -> list[str]:
    """Stop the job the test's site left after its round; that round's outcomes. A loop's mistake is not
    the site's budget: the server may draw it again (it was benched for the run before)."""
    federation.close()
    coordinator.stop()
    driver.join(timeout=30)
    store.close()
    assert "site-0" not in coordinator._out_of_budget, coordinator._out_of_budget
    return [o.outcome for o in outcomes]


def test_an_engine_site_whose_batches_are_not_poisson_sampled_never_releases_an_update(tmp_path: Path) -> None:
    """A site's own Opacus engine counts every step as a Poisson-sampled batch at rate 1/len(loader),
    whatever the loader does: with ``poisson_sampling=False`` (shuffled, fixed-size batches), or with
    gradients accumulated over several batches per step, the ε it reports would be too low. Such an
    engine is refused at ``federate``; a plain loader handed to ``rnd.privatize`` is refused before any
    step; a wrapper that allows accumulation by the time of release has its round declined."""
    from opacus import PrivacyEngine

    assert task.synthetic_data is not None
    dataset = task.synthetic_data(0, 3, SEED)
    plain = DataLoader(dataset, batch_size=32)

    def private(poisson: bool) -> tuple[PrivacyEngine, Any, Any, Any]:
        engine = PrivacyEngine()
        model = nn.Sequential(nn.Linear(10, 1))
        wrapped = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      data_loader=plain, noise_multiplier=1.0, max_grad_norm=1.0,
                                      poisson_sampling=poisson)
        return (engine, *wrapped)

    config = job(rounds=1, dp="local", dp_local_noise_multiplier=1.0, dp_local_max_grad_norm=1.0)
    coordinator, store, driver, _ = start_job_with_two_turnkey_sites(tmp_path, config)
    engine, model, _, _ = private(poisson=False)
    with pytest.raises(ValueError, match=r"^privacy_engine: .*allows gradient accumulation.*under-reported.*"
                       r"poisson_sampling=True"):
        federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"), model=model, privacy_engine=engine,
                 **secure_federate("site-0"))

    engine, model, optimizer, loader = private(poisson=True)
    federation = federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"), model=model,
                          privacy_engine=engine, **secure_federate("site-0"))
    outcomes = []
    for rnd in federation:
        with pytest.raises(fedveil.clients.ClientError, match=r"loader: its batches are not Poisson-sampled "
                           r"\(batch sampler BatchSampler\)"):
            rnd.privatize(model, optimizer, plain)
        steps_before = len(engine.accountant.history)
        assert steps_before == 0  # refused before any step
        model, optimizer, loader = rnd.privatize(model, optimizer, loader)  # the loader make_private returned
        model.allow_grad_accumulation()  # then several batches per step: not what the accountant counts
        for x, y in loader:
            if len(y):
                optimizer.zero_grad()
                nn.BCEWithLogitsLoss()(model(x).squeeze(-1), y).backward()
                optimizer.step()
        outcomes.append(rnd.submit(model))
        break  # the attempt aborts without this site; its retries are not this test's
    assert declined_alone(federation, coordinator, driver, store, outcomes) == ["declined"]
    assert "allows gradient accumulation" in outcomes[0].reason


@pytest.mark.parametrize(("outside", "reason"), [
    ("inner step", r"stepped its optimizer 1 time\(s\) outside DP-SGD .*step only the optimizer your make_private"),
    ("weights moved", r"1 weight tensor\(s\) changed after DP-SGD's last noised step"),
    ("no private step", r"2 weight tensor\(s\) changed after DP-SGD's last noised step \(or with none\)"),
    ("moved between steps", r"the weights changed outside DP-SGD before 1 of its noised step"),
    ("before privatize", r"the model's weights changed after the round's global model was loaded and before "
                         r"rnd\.privatize"),
])
def test_an_engine_site_that_trains_outside_its_engine_never_releases_the_update(
    tmp_path: Path, outside: str, reason: str,
) -> None:
    """A site with its own Opacus engine that hands its objects to ``rnd.privatize`` is held to what its
    accountant counted, as ``rnd.privatize``'s own DP-SGD is: a step of the optimizer under the DP one,
    a weight changed after the last noised step, or training with no noised step at all keeps the round
    home (declined), since the reported ε would not cover it."""
    from opacus import PrivacyEngine

    assert task.synthetic_data is not None
    dataset = task.synthetic_data(0, 3, SEED)
    engine = PrivacyEngine()
    plain_model = nn.Sequential(nn.Linear(10, 1))
    model, optimizer, loader = engine.make_private(
        module=plain_model, optimizer=torch.optim.SGD(plain_model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=32), noise_multiplier=1.0, max_grad_norm=1.0)
    config = job(rounds=1, dp="local", dp_local_noise_multiplier=1.0, dp_local_max_grad_norm=1.0)
    coordinator, store, driver, _ = start_job_with_two_turnkey_sites(tmp_path, config)
    federation = federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"), model=model,
                          privacy_engine=engine, **secure_federate("site-0"))
    outcomes = []
    for rnd in federation:
        if outside == "before privatize":  # a plain step first: privatize refuses the model, before any DP step
            with torch.no_grad():
                plain_model[0].bias.add_(0.5)
            with pytest.raises(fedveil.clients.ClientError, match=reason):
                rnd.privatize(model, optimizer, loader)
            break
        model, optimizer, loader = rnd.privatize(model, optimizer, loader)
        for step, (x, y) in enumerate(loader):
            if len(y) and outside != "no private step":
                optimizer.zero_grad()
                nn.BCEWithLogitsLoss()(model(x).squeeze(-1), y).backward()
                optimizer.step()
            if outside == "moved between steps" and step == 0:  # by hand between the first two noised steps
                with torch.no_grad():
                    plain_model[0].bias.add_(0.5)
        if outside == "inner step":  # one more step of the plain SGD under the DP optimizer: no clip, no noise
            optimizer.zero_grad()
            nn.BCEWithLogitsLoss()(model(x).squeeze(-1), y).backward()
            optimizer.original_optimizer.step()
        elif outside == "weights moved":
            with torch.no_grad():
                plain_model[0].bias.add_(0.5)
        elif outside == "no private step":  # trained by hand, with no DP step at all
            with torch.no_grad():
                for p in plain_model.parameters():
                    p.add_(0.1)
        outcomes.append(rnd.submit(model))
        break  # the attempt aborts without this site; its retries are not this test's
    if outside == "before privatize":
        assert declined_alone(federation, coordinator, driver, store, outcomes) == []
        return
    assert declined_alone(federation, coordinator, driver, store, outcomes) == ["declined"]
    assert re.search(reason, outcomes[0].reason), outcomes[0].reason


def test_a_client_whose_model_does_not_fit_the_job_gets_a_clear_error(tmp_path: Path) -> None:
    config = job(rounds=1)
    coordinator, store, driver, _ = start_job_with_two_turnkey_sites(tmp_path, config)
    wrong = nn.Sequential(nn.Linear(12, 1))
    with pytest.raises(ModelMismatchError, match=r"does not fit the job's model: 0\.weight: the job's model has "
                       r"shape \(1, 10\), this site's model has shape \(1, 12\)") as refused:
        for _rnd in federate(task=TASK, transport=InProcessTransport(coordinator, "site-0"), model=wrong,
                             **secure_federate("site-0")):
            pass
    assert refused.value.field == "model"
    coordinator.stop()
    driver.join(timeout=30)
    store.close()


@pytest.mark.slow
def test_tls_clients_verify_the_server_against_their_ca_and_refuse_another(tmp_path: Path) -> None:
    ca = generate_ca("hub CA")
    leaf = generate_certificate("hub", ca, hostnames=["127.0.0.1", "localhost"])
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "other-ca.pem").write_bytes(generate_ca("someone else").cert_pem)
    address, tokens, server, out = start_server(job(rounds=1), tmp_path, TlsSettings(leaf.cert_pem, leaf.key_pem))

    impostor_view = federate(address, task=task, token=tokens[0], ca_cert=tmp_path / "other-ca.pem",
                             backoff=BackoffPolicy(initial_delay_s=0.1, max_delay_s=0.5, give_up_after_s=2.0),
                             **secure_federate("site-0"))
    # the server's certificate does not chain to this CA: no connection, said at once (no retries, which
    # would end in GaveUp after the 2 s give-up time)
    with pytest.raises(fedveil.clients.ClientError, match=r"^cannot join the job: the server's TLS certificate "
                       r"does not verify against this client's CA \(ca_cert"):
        next(iter(impostor_view))
    impostor_view.close()

    results = []
    threads = []
    for i in range(3):
        assert task.synthetic_data is not None
        data = task.synthetic_data(i, 3, SEED)
        fed = federate(address, task=task, token=tokens[i], ca_cert=tmp_path / "ca.pem", seed=i, num_examples=200,
                       evaluate=evaluator(task, data), **secure_federate(f"site-{i}"))
        threads.append(threading.Thread(target=lambda f=fed, d=data: results.append(run_client(f, task, d))))
        threads[-1].start()
    server.join(timeout=120)
    for t in threads:
        t.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert out["summary"].status == "completed"
    # one training round, then the final evaluation: an evaluation-only round numbered rounds + 1 (secure sums)
    assert [[(o.round, o.outcome) for o in r] for r in results] == [[(1, "completed"), (2, "completed")]] * 3


def test_federate_refuses_a_malformed_token_before_connecting() -> None:
    secret_looking = "fvt1.deadbeef.s3cr3t"
    with pytest.raises(ValueError, match=r"^token: malformed token") as info:
        fedveil.federate("127.0.0.1:1", task=TASK, token=secret_looking, insecure=True)
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ValueError, match=r"^server: expected HOST:PORT"):
        fedveil.federate("nohost", task=TASK, token=None, insecure=True)
