"""One run of the healthcare federation through fedveil's real coordinator and clients.

Nothing here is simulated: the server side is :class:`fedveil.server.coordinator.Coordinator`
with its SQLite :class:`~fedveil.server.store.RunStore`, run as every job is run
(:class:`fedveil.server.job_runner.JobRunner`, with the gRPC safeguards of ``fedveil server``), and each hospital is a
:class:`fedveil.clients.Federation` client that trains with the task's training function and
the turnkey :func:`fedveil.clients.train_round` (local DP-SGD through
:class:`fedveil.dp.local.LocalDPSession` when ``dp="local"``), then takes part in secure
aggregation. By default every hospital talks to the coordinator over **gRPC on loopback with
TLS** (a throwaway CA and server certificate made for the run) and its own enrolment token;
``transport="in-process"`` calls the coordinator directly instead (same validation, same
protocol, no sockets).

Each hospital reads its patients from its **own data directory** (a CSV file in the task's
schema); the coordinator never sees that file, only masked updates.

Dropouts: :class:`DropoutPlan` decides, before the run, which hospitals drop out of which
rounds (each hospital with probability ``dropout`` per round, never so many that fewer than
the secure-aggregation threshold would remain). A dropping hospital trains and takes part in
the key exchange as usual, but its masked update is held back in its transport
(:class:`_LateMaskedInput`) until the masked-input stage's deadline has passed: the
coordinator closes the stage without it, the survivors reveal the Shamir shares that remove
its pairwise masks, and the round completes with the others (Bonawitz et al. 2017, the
dropout case secure aggregation exists for). The dropped hospital still counts the privacy
spent on its local training, since it did train.

Serving: the model the run serves (its result's ``model`` and ``served`` figures, and the model
``on_round`` hands over) is the mean of the last ``recipe.average_last`` released global models
(:class:`fedveil.demo.served_model.ServedModel`); each round's own figures are the released model's.

Monitoring: the coordinator commits each round (model checkpoint, ledger, dropouts) to the
store in one transaction and then tells its listeners (:mod:`fedveil.server.events`); the demo's
listener, :class:`_RoundObserver`, takes each ``RoundCompleted`` to evaluate the new global model
on the held-out test set and to read each hospital's own privacy accountant.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedveil.demo import healthcare
from fedveil.demo.recipe import Recipe
from fedveil.demo.served_model import ServedModel
from fedveil.server.events import JobEvent, RoundCompleted
from fedveil.server.store import RunStore

log = logging.getLogger("fedveil.demo")

Transport = Literal["grpc", "in-process"]
DpMode = Literal["local", "central", "distributed", "none"]
TASK_REFERENCE = "fedveil.demo.healthcare:task"


@dataclass(frozen=True)
class FederationSettings:
    """What one run of the federation does (the CLI flags and the dashboard's form map here)."""

    rounds: int
    hospitals_per_round: int
    dp: DpMode = "local"
    epsilon_budget: float = 3.0
    dropout: float = 0.0
    transport: Transport = "grpc"
    seed: int = 0
    round_timeout: float = 60.0
    stage_timeout: float = 3.0
    user_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1 (got {self.rounds})")
        if self.hospitals_per_round < 2:
            raise ValueError(
                f"hospitals per round must be at least 2 for secure aggregation (got {self.hospitals_per_round})"
            )
        if self.dp not in ("local", "central", "distributed", "none"):
            raise ValueError(f"dp must be local, central, distributed or none (got {self.dp!r})")
        if not (math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0):
            raise ValueError(f"epsilon budget must be a positive number (got {self.epsilon_budget})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.transport not in ("grpc", "in-process"):
            raise ValueError(f"transport must be grpc or in-process (got {self.transport!r})")

    @property
    def threshold(self) -> int:
        """The coordinator's default secure-aggregation threshold for this cohort: the smallest t
        with 2t > h + c on the complete graph (the demo's jobs keep the coordinator's defaults)."""
        from fedveil.secagg import plan_threshold

        return plan_threshold(self.hospitals_per_round).threshold


@dataclass(frozen=True)
class DropoutPlan:
    """Which hospitals stay silent in which round (1-based), fixed before the run."""

    silent: Mapping[int, frozenset[str]]

    @classmethod
    def draw(cls, hospitals: Sequence[str], rounds: int, probability: float, max_silent: int, seed: int) -> DropoutPlan:
        rng = np.random.default_rng([seed, 0xD209])
        plan: dict[int, frozenset[str]] = {}
        for r in range(1, rounds + 1):
            drop = [h for h in hospitals if rng.random() < probability]
            if len(drop) > max_silent:
                keep = rng.choice(len(drop), size=max_silent, replace=False).tolist() if max_silent > 0 else []
                drop = [drop[i] for i in sorted(int(k) for k in keep)]
            if drop:
                plan[r] = frozenset(drop)
        return cls(plan)

    @classmethod
    def replay(cls, rounds: Sequence[RoundReport], hospitals: Sequence[str]) -> DropoutPlan:
        """Silence, in each of these rounds, every hospital that did not take part in it (a hospital
        that dropped, declined or was not chosen), so that another run has the same cohorts."""
        plan = {r.round: frozenset(h for h in hospitals if h not in r.participants) for r in rounds}
        return cls({number: silent for number, silent in plan.items() if silent})

    def is_silent(self, hospital: str, round_number: int) -> bool:
        return hospital in self.silent.get(round_number, frozenset())


@dataclass
class RoundReport:
    """One completed round as the demo shows it."""

    round: int
    accuracy: float
    auc: float
    loss: float
    participants: list[str]
    dropped: list[str]
    epsilon_sample: dict[str, float | None]
    epsilon_sample_max: float | None
    epsilon_user: float | None
    budget_remaining: dict[str, float | None]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ServedScore:
    """The served model (the mean of the last released global models) on the run's test set."""

    accuracy: float
    auc: float
    loss: float
    #: the rounds whose global models it averages
    rounds: list[int]
    #: how it was made, e.g. "mean of the global models of rounds 26–30"
    description: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FederationResult:
    run_id: str
    status: str
    message: str
    rounds: list[RoundReport]
    #: the served model: the mean of the last ``recipe.average_last`` global models
    model: torch.nn.Module
    hospitals: dict[str, dict[str, Any]]
    epsilon_user: float | None
    client_errors: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    #: the served model's figures on the test set (None when no round was released)
    served: ServedScore | None = None


class _RoundObserver:
    """A job listener: each released round (already committed to the store) goes to ``observer``."""

    def __init__(self, observer: Callable[[RoundCompleted], None]) -> None:
        self._observer = observer

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, RoundCompleted):
            self._observer(event)


TEST_SET_ROW = "(held-out test set)"
"""The store's evaluation row of each round's model on the demo's own test set (no hospital's data)."""


def server_config(settings: FederationSettings, recipe: Recipe, n_hospitals: int) -> Any:
    """The coordinator's job configuration for this run."""
    from fedveil.dp.calibration import solve_noise_multiplier
    from fedveil.server.config import ServerConfig

    k = settings.hospitals_per_round
    common: dict[str, Any] = dict(
        task=TASK_REFERENCE, rounds=settings.rounds, clients_per_round=k, min_clients=k,
        round_timeout=settings.round_timeout, stage_timeout=settings.stage_timeout, cohort_wait=1.0,
        optimizer=recipe.server_optimizer, server_lr=recipe.server_lr, learning_rate=recipe.local_lr,
        batch_size=recipe.batch_size, local_epochs=recipe.local_epochs, dp_delta=recipe.delta,
        dp_accountant=recipe.accountant, seed=settings.seed, clip_range=16.0, linger=2.0, poll_wait=2.0,
        max_round_attempts=3,
        # The demo scores every global model on its own held-out test set (the round observer records it in
        # the store for the dashboard); the hospitals are never asked to evaluate on their patients.
        evaluation="off", final_evaluation=False,
    )
    if settings.dp == "local":
        common.update(dp="local", dp_local_target_epsilon=settings.epsilon_budget,
                      dp_local_max_grad_norm=recipe.clip_norm, dp_client_epsilon_budget=settings.epsilon_budget)
    elif settings.dp in ("central", "distributed"):
        # Calibrate for the accounting the server will do: it claims no sampling amplification (the
        # default of --dp-sampling-amplification; distributed DP never does), so every round is q = 1.
        q = 1.0
        if settings.dp == "central":
            z = solve_noise_multiplier(target_epsilon=settings.epsilon_budget, delta=recipe.delta, sample_rate=q,
                                       steps=settings.rounds, accountant=recipe.accountant).noise_multiplier
        else:
            z = distributed_noise_multiplier(settings, recipe.delta, q)
        common.update(dp=settings.dp, dp_clip=settings.user_clip, dp_noise_multiplier=z,
                      dp_epsilon_budget=settings.epsilon_budget)
    else:
        common.update(dp="none")
    return ServerConfig.from_flat(**common)


def user_level_noise_ratio(settings: FederationSettings, recipe: Recipe, n_hospitals: int) -> float | None:
    """Norm of the user-level noise on one round's mean update, over the largest clipped update ``S``.

    None without a user-level mechanism. Central DP adds ``N(0, (zS)²)`` per coordinate to the sum
    of ``k`` updates and divides by ``k``; distributed DP sizes each share so that the threshold
    ``t`` of contributors already carry the full noise, so ``k`` contributors carry ``k / t`` times
    the variance. Above 1 the noise outweighs every hospital's contribution together in every round:
    user-level DP over a handful of participants cannot train a useful model (McMahan et al. 2018
    need thousands of users per round).
    """
    if settings.dp not in ("central", "distributed"):
        return None
    z = float(server_config(settings, recipe, n_hospitals).privacy.noise_multiplier)
    k = settings.hospitals_per_round
    dim = sum(p.numel() for p in healthcare.build_model().parameters())
    spread = math.sqrt(k / settings.threshold) if settings.dp == "distributed" else 1.0
    return z * spread * math.sqrt(dim) / k


def distributed_noise_multiplier(settings: FederationSettings, delta: float, sample_rate: float) -> float:
    """Smallest z (bisection) whose distributed-DP rounds stay within the budget *as the server accounts them*:

    the mechanism's own RDP bound (Skellam, 20-bit ring) for the smallest number of contributors a
    round can complete with (the threshold), composed over all rounds.
    """
    from fedveil.dp.accounting import make_accountant
    from fedveil.dp.distributed import derive_parameters

    dim = sum(p.numel() for p in healthcare.build_model().parameters())

    def epsilon(z: float) -> float:
        cfg = derive_parameters(settings.hospitals_per_round, dim, settings.user_clip, noise_multiplier=z)
        acc = make_accountant("rdp")
        acc.compose(cfg.rdp_event(rounds=settings.rounds, n_contributors=settings.threshold, sample_rate=sample_rate))
        return float(acc.get_epsilon(delta))

    target = settings.epsilon_budget * 0.999  # stay clear of the ledger's budget stop by a hair
    lo, hi = 0.1, 1.0
    while epsilon(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches ε = {settings.epsilon_budget} with distributed DP")
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(mid) > target else (lo, mid)
    return hi


def run_federation(
    *,
    store_path: Path,
    site_files: Mapping[str, Path],
    test: TensorDataset,
    settings: FederationSettings,
    recipe: Recipe,
    dropout_plan: DropoutPlan | None = None,
    on_round: Callable[[RoundReport, torch.nn.Module], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> FederationResult:
    """Run one federation to completion.

    ``on_round`` is called after each committed round with the round's report and the model served
    from then on (the mean of the last ``recipe.average_last`` global models so far).
    """
    from fedveil.clients import ClientOptions, Federation
    from fedveil.clients.api import evaluator
    from fedveil.clients.backoff import BackoffPolicy
    from fedveil.dp.ledger import FEDERATION, PrivacyLedger
    from fedveil.protocol.tls import generate_ca, generate_certificate
    from fedveil.server.job_runner import GrpcEndpoint, JobRunner, TlsSettings
    from fedveil.simulation.backends import STILL_RUNNING, SimulatedSites, ThreadedClient, run_with_client_threads
    from fedveil.task import vector_to_model

    task = healthcare.task_with(recipe.feature_transform)
    names = sorted(site_files)
    if len(names) < settings.hospitals_per_round:
        raise ValueError(f"{len(names)} hospitals cannot fill cohorts of {settings.hospitals_per_round}")
    data = {name: task.load_dataset(site_files[name]) for name in names}
    plan = dropout_plan or DropoutPlan({})
    started = time.monotonic()
    federations: dict[str, Any] = {}
    reports: list[RoundReport] = []
    last_round_end = [started]
    served = ServedModel(recipe.average_last, task.build_model)

    def hospital_epsilons() -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in names:
            fed = federations.get(name)
            spend = fed.local_privacy if fed is not None else None
            out[name] = float(spend.epsilon) if spend is not None else (0.0 if settings.dp == "local" else None)
        return out

    def observe(event: RoundCompleted) -> None:
        run_id, number, attempt = event.run_id, event.round, event.attempt
        model = task.build_model()
        vector_to_model(np.asarray(event.model, dtype=np.float32), model)
        metrics = healthcare.evaluate(model, test)
        store.record_evaluation(run_id, number, TEST_SET_ROW, len(test), metrics)
        participants = sorted(n for a, n, _, _ in store.participants(run_id, number) if a == attempt)
        drops = sorted({name for (r, a, name, _, _) in store.dropouts(run_id) if r == number and a == attempt})
        participants = [p for p in participants if p not in drops]
        eps_user = None
        if settings.dp in ("central", "distributed") and event.ledger_json:
            eps_user = float(PrivacyLedger.from_json(event.ledger_json).epsilon(FEDERATION))
        eps: dict[str, float | None] = hospital_epsilons() if settings.dp == "local" else dict.fromkeys(names)
        finite = [e for e in eps.values() if e is not None]
        eps_max = max(finite) if finite else (eps_user if settings.dp in ("central", "distributed") else None)
        if settings.dp == "local":
            remaining = {n: (settings.epsilon_budget - e if e is not None else None) for n, e in eps.items()}
        elif eps_user is not None:
            remaining = {"federation": settings.epsilon_budget - eps_user}
        else:
            remaining = {}
        now = time.monotonic()
        report = RoundReport(
            round=number, accuracy=metrics["accuracy"], auc=metrics["auc"], loss=metrics["loss"],
            participants=participants, dropped=drops, epsilon_sample=eps, epsilon_sample_max=eps_max,
            epsilon_user=eps_user, budget_remaining=remaining, seconds=now - last_round_end[0],
        )
        last_round_end[0] = now
        reports.append(report)
        served.add(number, model)
        if on_round is not None:
            on_round(report, served.model())

    store = RunStore(store_path)
    runner: JobRunner | None = None
    try:
        tokens = {name: store.enroll(name, rotate=store.client_enrolled(name)).token for name in names}
        # the secure default: an in-memory consortium authority vouches for each simulated hospital
        sites = SimulatedSites.create(server_config(settings, recipe, len(names)), names)
        config = sites.config
        # the job runs as every job does (fedveil.server.job_runner): over TLS on loopback with the
        # safeguards of `fedveil server`, or in process
        ca = leaf = None
        endpoint = None
        if settings.transport == "grpc":
            ca = generate_ca("fedveil demo CA", days=1)
            leaf = generate_certificate("localhost", ca, hostnames=["localhost", "127.0.0.1"], days=1)
            endpoint = GrpcEndpoint("127.0.0.1:0", TlsSettings(leaf.cert_pem, leaf.key_pem))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = JobRunner(config, task, store, new_run=True, listeners=[_RoundObserver(observe)],
                               endpoint=endpoint)
        if on_start is not None:
            on_start(runner.run_id)
        make_transport: Callable[[str], Any]
        if ca is not None:
            make_transport = _grpc_transports(ca.cert_pem, int(runner.port or 0), tokens)
        else:
            make_transport = runner.transport

        clients = []
        for index, name in enumerate(names):
            dataset = data[name]
            identity, credential = sites.identity(name)
            options = ClientOptions(
                seed=settings.seed * 1000 + index + 1, num_examples=len(dataset), evaluate=evaluator(task, dataset),
                identity_key=identity, credential=credential, policy=sites.policy(),
                poll_wait_ms=1000, backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=1.0, give_up_after_s=60.0),
            )
            fed = Federation(_LateMaskedInput(make_transport(name), name, plan), task.name, task.build_model(),
                             options)
            federations[name] = fed
            clients.append(ThreadedClient(name, fed, dataset))
        # a round retried after an abort that a hospital's budget cannot afford is declined inside
        # run_client (the hospital sits it out and stays in the job)
        summary, _, client_errors = run_with_client_threads(
            runner.run, runner.stop, task, clients, join_timeout_s=30.0,
            min_live_clients=settings.hospitals_per_round, site_gone=runner.coordinator.site_gone,
        )
        message = summary.message
        failures = {n: e for n, e in client_errors.items() if e != STILL_RUNNING}
        if summary.status == "stopped" and failures:
            message = ("stopped: too few hospitals left to fill a round after "
                       + "; ".join(f"{name} failed ({err})" for name, err in sorted(failures.items())))
        eps_now = hospital_epsilons()
        hospitals = {
            name: {
                "patients": len(data[name]),
                "malignant_share": float(data[name].tensors[1].float().mean()),
                "rounds_joined": sum(1 for r in reports if name in r.participants),
                "epsilon": eps_now.get(name),
                "noise_multiplier": _noise_of(federations.get(name)),
            }
            for name in names
        }
        model = served.model() if reports else task.build_model()
        score = None
        if reports:
            m = healthcare.evaluate(model, test)
            score = ServedScore(m["accuracy"], m["auc"], m["loss"], served.rounds, served.describe())
        return FederationResult(
            run_id=summary.run_id, status=summary.status, message=message, rounds=reports,
            model=model, hospitals=hospitals, epsilon_user=summary.epsilon, client_errors=client_errors,
            wall_seconds=time.monotonic() - started, served=score,
        )
    finally:
        if runner is not None:
            runner.close()
        store.close()


class _LateMaskedInput:
    """A hospital's transport that holds back its masked input in the rounds it drops out of.

    Everything else passes straight through. In a dropout round the masked input is sent only
    after the stage deadline (read from the server's ``IncomingShares``), so the coordinator has
    closed the stage and answers ABORTED: the hospital is a dropout of that round.
    """

    def __init__(self, inner: Any, name: str, plan: DropoutPlan) -> None:
        self._inner = inner
        self._name = name
        self._plan = plan
        self._masked_deadline = 0.0

    def poll(self, request: Any) -> Any:
        response = self._inner.poll(request)
        if response.WhichOneof("instruction") == "incoming_shares":
            self._masked_deadline = response.incoming_shares.deadline_unix_ms / 1000.0
        return response

    def submit_masked_input(self, request: Any) -> Any:
        if self._plan.is_silent(self._name, int(request.header.round)):
            time.sleep(max(0.0, self._masked_deadline - time.time()) + 0.25)
        return self._inner.submit_masked_input(request)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def _noise_of(fed: Any) -> float | None:
    spend = fed.local_privacy if fed is not None else None
    return float(spend.noise_multiplier) if spend is not None else None


def _grpc_transports(ca_cert_pem: bytes, port: int, tokens: Mapping[str, str]) -> Callable[[str], Any]:
    """Per-hospital token transports to the job's TLS endpoint on 127.0.0.1."""
    from fedveil.protocol.client import ChannelConfig, GrpcTransport, open_channel

    def make(name: str) -> Any:
        channel = open_channel(ChannelConfig(target=f"127.0.0.1:{port}", ca_cert_pem=ca_cert_pem,
                                             server_name_override="localhost"))
        return GrpcTransport(channel, tokens[name], rpc_timeout_s=60.0)

    return make
