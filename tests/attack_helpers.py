"""A malicious server for attack tests: the real coordinator underneath, a script on top.

:class:`TamperingServer` implements the RPCs the client calls. Every call goes to a real
:class:`~fedveil.server.coordinator.Coordinator` (so the honest sites see a real job), but what
the *victim* site receives can be rewritten by a script (``tamper``), and everything the victim
sends is recorded. The victim runs the unmodified client code (:class:`fedveil.clients.Federation`).
That is the attacker's position: the server controls every byte a site receives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.clients import ClientOptions, Federation, run_client
from fedveil.clients.api import evaluator
from fedveil.clients.backoff import BackoffPolicy
from fedveil.clients.policy import SitePolicy
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.binding import BINDING_BYTES, bound_context
from fedveil.protocol.codec import model_digest, model_vector
from fedveil.protocol.errors import MalformedMessage
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg.identity import SiteCredential, issue_credential
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import Task
from tests.server_helpers import enroll_all

CONSORTIUM = "attack-tests"
DAY = 24 * 3600
AUTHORITY = Ed25519PrivateKey.generate()
"""The consortium authority of the attack tests' sites (:meth:`Consortium.create`); :func:`job_config`
gives the server its public key, as an active-adversary job requires."""


@dataclass
class Consortium:
    """An authority and one identity key + credential per site name (kept in memory)."""

    authority: Ed25519PrivateKey
    keys: dict[str, Ed25519PrivateKey]
    credentials: dict[str, SiteCredential]

    @property
    def authority_public(self) -> bytes:
        return self.authority.public_key().public_bytes_raw()

    @classmethod
    def create(cls, names: Sequence[str], name: str = CONSORTIUM) -> Consortium:
        authority = AUTHORITY
        keys = {n: Ed25519PrivateKey.generate() for n in names}
        now = int(time.time())
        creds = {n: issue_credential(authority, name, n, k.public_key().public_bytes_raw(),
                                     not_before=now - DAY, not_after=now + DAY) for n, k in keys.items()}
        return cls(authority, keys, creds)

    def policy(self, **kw: Any) -> SitePolicy:
        return SitePolicy(authority_public_key=self.authority_public, consortium=CONSORTIUM, **kw)

    def options(self, name: str, **kw: Any) -> ClientOptions:
        kw.setdefault("policy", self.policy())
        return ClientOptions(identity_key=self.keys[name], credential=self.credentials[name].encode(), **kw)


@dataclass
class Recorded:
    """What the victim sent, in order: (rpc, request)."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def named(self, rpc: str) -> list[Any]:
        return [r for name, r in self.calls if name == rpc]


class TamperingServer:
    """A :class:`~fedveil.protocol.transport.FederationService` that lies to one victim."""

    def __init__(self, coordinator: Coordinator, victim: str,
                 tamper: Callable[[pb.PollResponse], pb.PollResponse | None] | None = None,
                 tamper_join: Callable[[pb.JoinResponse], pb.JoinResponse] | None = None, *,
                 rebind: bool = False) -> None:
        self.coordinator = coordinator
        self.victim = victim
        self.tamper = tamper
        self.tamper_join = tamper_join
        self.rebind = rebind
        """After tampering, bind the RoundStart's context to what the victim is shown (as a careful liar would)."""
        self.sent = Recorded()

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        real = getattr(self.coordinator, rpc)

        def call(caller: str, request: Any, *rest: Any) -> Any:
            if caller == self.victim:
                self.sent.calls.append((rpc, request))
            return real(caller, request, *rest)

        return call

    def join(self, caller: str, request: pb.JoinRequest) -> pb.JoinResponse:
        response = self.coordinator.join(caller, request)
        if caller == self.victim:
            self.sent.calls.append(("join", request))
            if self.tamper_join is not None:
                response = self.tamper_join(response)
        return response

    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse:
        response = self.coordinator.poll(caller, request)
        if caller != self.victim or self.tamper is None:
            return response
        out = pb.PollResponse()
        out.CopyFrom(response)
        tampered = self.tamper(out)
        result = tampered if tampered is not None else out
        if self.rebind and result.WhichOneof("instruction") == "round_start":
            rebind(result.round_start, self.coordinator)
        return result


class RecordingCoordinator(Coordinator):
    """The real coordinator, recording every round result it applies (``applied``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied: list[Any] = []
        real_apply = self.model.apply

        def apply(plan: Any, ring_sum: Any, survivors: Any, declared: Any = None) -> Any:
            applied = real_apply(plan, ring_sum, survivors, declared)
            self.applied.append(applied)
            return applied

        self.model.apply = apply  # type: ignore[method-assign]


def rebind(start: pb.RoundStart, coordinator: Coordinator) -> None:
    """What a malicious server does after changing a round's terms: bind the context to them again, with
    the digest of the model it shows (inline in process; else the one the coordinator serves)."""
    base = bytes(start.secagg.context)[:-BINDING_BYTES]
    try:
        digest = model_digest(model_vector(start.model)) if start.model.data else coordinator._published_model().digest
    except MalformedMessage:  # a model the site refuses before any binding is checked
        return
    start.secagg.context = bound_context(base, start, digest)


# ``cohort_wait`` for a job with min_clients < clients_per_round whose sites all join: the cohort is
# then drawn once all K are in, not from the first M when one site's start-up lags on a loaded machine.
ALL_JOIN_WAIT = 5.0
# Deadlines for a job where every site answers and the test counts the attempts: DP-SGD on a
# machine running many tests at once can take longer than the default 5 s stage deadline.
RESPONSIVE_DEADLINES: dict[str, Any] = {"stage_timeout": 30.0, "round_timeout": 120.0}


def job_config(**kw: Any) -> ServerConfig:
    base: dict[str, Any] = dict(task="fedveil.tasks.synthetic", rounds=1, clients_per_round=4, min_clients=4,
                                seed=3, cohort_wait=0.5, linger=0.5, poll_wait=0.5, round_timeout=8.0,
                                stage_timeout=5.0, final_evaluation=False, max_round_attempts=2,
                                consortium=CONSORTIUM,
                                authority_public_key=AUTHORITY.public_key().public_bytes_raw().hex())
    base.update(kw)
    return ServerConfig.from_flat(**base)


def site_federation(service: Any, task: Task, name: str, index: int, consortium: Consortium,
                    n: int = 4, transport: type[InProcessTransport] = InProcessTransport,
                    give_up_after_s: float = 20.0, **options: Any) -> Federation:
    assert task.synthetic_data is not None
    data = task.synthetic_data(index, n, 3)
    options = {"evaluate": evaluator(task, data), **options}  # evaluate=None: a site without an evaluator
    opts = consortium.options(name, seed=100 + index, num_examples=len(data),
                              poll_wait_ms=300, backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=0.3,
                                                                      give_up_after_s=give_up_after_s),
                              **options)
    return Federation(transport(service, name), task.name, task.build_model(), opts)


def run_job(tmp_path: Path, config: ServerConfig, task: Task, sites: Sequence[Callable[[Any], Any]],
            service: Callable[[Coordinator], Any] | None = None,
            coordinator_cls: type[Coordinator] = Coordinator,
            new_run: bool = True, enrolled: Sequence[str] = ()) -> tuple[JobSummary, list[Any], list[BaseException]]:
    """Run a job with one thread per site function (given the service it talks to); ``new_run=False``
    resumes the store's unfinished run, as a restarted server does. ``enrolled``: sites to enroll in
    the store first (then a cohort is drawn without waiting ``cohort_wait`` once every enrolled site
    that may be drawn is connected)."""
    store = RunStore(tmp_path / "run.sqlite")
    enroll_all(store, enrolled)
    coordinator = coordinator_cls(config, task, store, new_run=new_run)
    front = service(coordinator) if service is not None else coordinator
    results: list[Any] = [None] * len(sites)
    errors: list[BaseException] = []

    def main(i: int) -> None:
        try:
            results[i] = sites[i](front)
        except BaseException as err:  # surfaced by the test
            errors.append(err)

    threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(len(sites))]
    for t in threads:
        t.start()
    try:
        summary = coordinator.run()
    finally:
        coordinator.stop()
    for t in threads:
        t.join(timeout=60)
    store.close()
    return summary, results, errors


def turnkey(task: Task, name: str, index: int, consortium: Consortium, n: int = 4,
            transport: type[InProcessTransport] = InProcessTransport, **options: Any) -> Callable[[Any], Any]:
    """A site thread's whole job: join through ``transport`` and train until the job ends (``options`` go to
    :func:`site_federation`: ``give_up_after_s``, or the site's :class:`FederationOptions`)."""
    def go(service: Any) -> Any:
        fed = site_federation(service, task, name, index, consortium, n, transport, **options)
        assert task.synthetic_data is not None
        history = run_client(fed, task, task.synthetic_data(index, n, 3))
        return fed, history
    return go
