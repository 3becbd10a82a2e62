"""The front door for an existing PyTorch training loop: :func:`federate`.

A data scientist keeps their loop; four lines change (see docs/federate-your-loop.md)::

    for rnd in fedveil.federate(server="consortium-hub:7000", model=model, token=TOKEN, ca_cert="hub.pem"):
        model, optimizer, loader = rnd.privatize(model, optimizer, loader)  # local DP only
        for x, y in loader:               # the user's own loop, unchanged
            ...
        rnd.submit(model)

``rnd.model`` is the user's own module with the round's global weights loaded; ``rnd.submit``
sends the masked update and returns when the round is over.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedveil.clients.backoff import BackoffPolicy
from fedveil.clients.options import ClientOptions, EvaluateFn, RoundOutcome
from fedveil.clients.policy import SitePolicy, TrainingRefused
from fedveil.clients.round import Round
from fedveil.clients.session import Federation
from fedveil.dp.ledger import BudgetExceededError
from fedveil.errors import FedveilError
from fedveil.protocol.auth import parse_token
from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.protocol.errors import Unauthenticated
from fedveil.protocol.tls import plaintext_refusal, read_pem
from fedveil.protocol.transport import Transport
from fedveil.task import Task, load_task

log = logging.getLogger("fedveil.client")


def federate(
    server: str | None = None,
    *,
    task: str | Task | None = None,
    token: str | None = None,
    model: nn.Module | None = None,
    ca_cert: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    insecure: bool = False,
    allow_insecure_remote: bool = False,
    seed: int | bytes | None = None,
    num_examples: int = 0,
    evaluate: EvaluateFn | None = None,
    backoff: BackoffPolicy | None = None,
    transport: Transport | None = None,
    server_name_override: str | None = None,
    identity_key: Ed25519PrivateKey | str | Path | None = None,
    credential: bytes | str | Path | None = None,
    authority: str | Path | None = None,
    revocations: str | Path | None = None,
    roster: str | Path | None = None,
    trust_server: bool = False,
    policy: SitePolicy | None = None,
    state: str | Path | None = None,
    insecure_deterministic: bool = False,
    privacy_engine: Any = None,
) -> Federation:
    """Join the job at ``server`` (``HOST:PORT``) and iterate over the rounds this client is in.

    Args:
        task: only for turnkey jobs (``"module:attr"`` or a :class:`~fedveil.task.Task`): its name must
            match the server's ``--task``, and its ``build_model`` makes the model when ``model`` is
            None. A loop site leaves it out: the job's model spec comes from the server at Join.
        token: the client's enrolment token (``fedveil enroll``).
        model: your own ``nn.Module`` (with ``privacy_engine``: the module your ``make_private`` call
            returned, whose Opacus wrapper says whether the engine samples Poisson batches); at Join it is
            checked against the job's model by name (names, shapes, dtypes) and each round loads the global
            weights into it by name.
        ca_cert: verify the server's TLS certificate against this CA (PEM file; default: the
            system roots).
        insecure: use plaintext instead of TLS: only to a loopback ``server`` (127.0.0.0/8, ::1,
            localhost) unless ``allow_insecure_remote``, since the token would travel in the clear.
        allow_insecure_remote: accept ``insecure`` to a server that is not on loopback.
        client_cert: PEM certificate for a server that requires mutual TLS (``fedveil server
            --client-ca``); the certificate's common name is this client.
        client_key: the private key (PEM) of ``client_cert``.
        seed: the client's private seed, for reproducible runs (default: random).
        num_examples: size of the local data set, reported to the server.
        evaluate: ``fn(model) -> {"loss": ..., "accuracy": ...}`` for federated evaluation.
        backoff: reconnect policy (default: jittered exponential, up to 10 s per wait, 5 min total).
        transport: a ready transport instead of ``server`` (e.g. in-process, for simulations).
        identity_key: this site's Ed25519 identity key (or its PEM file, ``fedveil identity create``).
        credential: this site's credential from the consortium authority (bytes or the file
            ``fedveil authority issue`` wrote), sent at Join so peers can check the site's identity.
        authority: the consortium authority's public file (``fedveil authority init``): pinned, every
            cohort member's credential must verify against it. Required unless ``trust_server``.
        revocations: the authority's latest revocation list this site holds.
        roster: a roster the authority signed (``fedveil authority roster``): checked once here,
            so the credentials it lists cost no signature check in a round.
        trust_server: opt in to the honest-but-curious server model (passive secure aggregation, no
            identity checks). Off by default: the site assumes a malicious server.
        policy: the full :class:`~fedveil.clients.policy.SitePolicy` (minimum cohort, colluding
            fraction, DP modes and noise floor, attempts, evaluation); ``authority``,
            ``revocations``, ``roster`` and ``trust_server`` fill in its identity fields.
        state: a file where the site keeps its attempts, releases and own privacy ledger across
            restarts (``fedveil budget report`` reads it).
        insecure_deterministic: derive keys, masks, rounding and noise from ``seed`` (tests only).
        privacy_engine: your own ``opacus.PrivacyEngine``, after your ``make_private[_with_epsilon]``
            call: fedveil loads each round's global weights into the wrapped module, computes the update
            from it, and reads the site's ε from the engine's accountant (reported, and held to the
            job's local target ε); ``rnd.privatize`` then returns its arguments unchanged.

    Raises:
        fedveil.model_spec.ModelMismatchError: at Join, ``model`` does not fit the job's model (the
            first differing parameter and both shapes named).
        fedveil.dp.compat.UnsupportedLayerError: at Join of a ``--dp local`` job, ``model`` has a layer
            DP-SGD cannot train (its path and the remedy named).
    """
    resolved = load_task(task) if isinstance(task, str) else task
    if model is None and resolved is None:
        raise ValueError("model: give your nn.Module (model=...), or a turnkey task (task=...)")
    if transport is None:
        if server is None:
            raise ValueError("server: required (HOST:PORT) unless a transport is given")
        target = check_server_address(server)
        refusal = plaintext_refusal(target, "allow_insecure_remote=True") if insecure else None
        if refusal is not None and not allow_insecure_remote:
            raise ValueError(f"insecure: {refusal}")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert: give client_cert and client_key together for mutual TLS")
        if token is not None:
            token = token.strip()  # as read from the file fedveil enroll's output went to
            try:  # fail at once on a mistyped token, not after the server refuses it
                parse_token(token)
            except Unauthenticated as err:
                raise ValueError(f"token: {err}") from None  # the message never repeats the token
        transport = GrpcTransport.connect(
            ChannelConfig(
                target=target,
                ca_cert_pem=read_pem(Path(ca_cert), "ca_cert") if ca_cert is not None else None,
                client_cert_pem=read_pem(Path(client_cert), "client_cert") if client_cert is not None else None,
                client_key_pem=read_pem(Path(client_key), "client_key") if client_key is not None else None,
                insecure=insecure,
                server_name_override=server_name_override,
            ),
            token,
        )
    if isinstance(identity_key, (str, Path)):
        identity_key = load_identity_key(Path(identity_key))
    options = ClientOptions(seed=seed, num_examples=num_examples, evaluate=evaluate, identity_key=identity_key,
                            policy=site_policy(policy, authority=authority, revocations=revocations,
                                               roster=roster, trust_server=trust_server),
                            credential=load_credential_arg(credential), state_path=Path(state) if state else None,
                            revocations_path=Path(revocations) if revocations is not None else None,
                            insecure_deterministic=insecure_deterministic, privacy_engine=privacy_engine)
    if backoff is not None:
        options.backoff = backoff
    if privacy_engine is not None:
        from fedveil.clients.local_dp import EngineDpClient, engine_sampling_problem

        EngineDpClient(privacy_engine)  # refuse a wrong object now, not at the first round
        problem = engine_sampling_problem(model)
        if problem:
            raise ValueError(problem)
    if model is None:
        assert resolved is not None
        model = resolved.build_model()
    return Federation(transport, resolved.name if resolved is not None else "", model, options)


def site_policy(policy: SitePolicy | None, *, authority: str | Path | None = None,
                revocations: str | Path | None = None, roster: str | Path | None = None,
                trust_server: bool = False) -> SitePolicy:
    """``policy`` (default: the malicious-server defaults) with the pinned authority and trust choice."""
    from fedveil.protocol.identity_files import load_authority_public, load_revocations, load_signed_roster
    from fedveil.secagg.identity import verify_revocations

    changes: dict[str, Any] = {}
    pinned = None
    if authority is not None:
        pinned = load_authority_public(Path(authority))
        changes.update(consortium=pinned.consortium, authority_public_key=pinned.public_key.raw)
    if revocations is not None:
        if pinned is None:
            raise ValueError("revocations: give the authority too (the list is checked against its key)")
        revocation_list = load_revocations(Path(revocations))
        verify_revocations(pinned.public_key, revocation_list, consortium=pinned.consortium)
        changes["revocations"] = revocation_list
    if roster is not None:  # the policy checks it against the pinned authority (PolicyError "roster" without one)
        changes["roster"] = load_signed_roster(Path(roster))
    if trust_server:
        changes["trust_server"] = True
    if policy is None:
        return SitePolicy(**changes)
    return dataclasses.replace(policy, **changes)


def load_credential_arg(credential: bytes | str | Path | None) -> bytes:
    """A credential given as bytes, or the path of the file ``fedveil authority issue`` wrote."""
    if credential is None:
        return b""
    if isinstance(credential, bytes):
        return credential
    from fedveil.protocol.identity_files import load_credential

    return load_credential(Path(credential)).encode()


class IdentityKeyError(FedveilError, ValueError):
    """A site's identity key file is missing or not an unencrypted Ed25519 PEM key; ``field`` is
    ``identity_key``."""


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file, e.g. ``openssl genpkey -algorithm ed25519``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IdentityKeyError(f"cannot read {str(path)!r}: {err.strerror}", field="identity_key") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityKeyError(f"{str(path)!r} is not an unencrypted PEM private key ({err})",
                               field="identity_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityKeyError(f"{str(path)!r} holds a {type(key).__name__}, not an Ed25519 key", field="identity_key")
    return key


def check_server_address(server: str) -> str:
    """``HOST:PORT`` with a port in 1..65535, else a ValueError naming the value."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server: expected HOST:PORT with a port in 1..65535 (got {server!r})")
    return server


def train_round(rnd: Round, task: Task, dataset: Dataset) -> RoundOutcome:
    """The turnkey client's round: the task's own training function on the local data set.

    The model goes into train mode first: an evaluation (the site's own, or the task's, run on the
    global model) may have left it in eval mode, which Opacus refuses for DP-SGD and which would
    train with dropout off and frozen batch statistics otherwise. Nothing is restored afterwards:
    the next round loads fresh global weights into the same module and trains it again.
    """
    model = rnd.model
    model.train()
    batch_size = rnd.batch_size or task.batch_size
    loader: DataLoader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=rnd.generator)
    optimizer = task.make_optimizer(model.parameters())
    if rnd.learning_rate > 0:
        for group in optimizer.param_groups:
            group["lr"] = rnd.learning_rate
    dp_model, dp_optimizer, dp_loader = rnd.privatize(model, optimizer, loader)
    for _ in range(rnd.local_epochs or task.local_epochs):
        task.train_epoch(dp_model, dp_loader, dp_optimizer)
    return rnd.submit(dp_model, num_examples=len(dataset))  # type: ignore[arg-type]


def evaluator(task: Task, dataset: TensorDataset) -> Callable[[nn.Module], dict[str, float]]:
    """``fn(model)`` evaluating ``task`` on ``dataset`` (for ``federate(evaluate=...)``)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return task.evaluate(model, dataset)

    return evaluate


def run_client(federation: Federation, task: Task, dataset: TensorDataset, *,
               leave_round_on: tuple[type[Exception], ...] = (),
               after_round: Callable[[Round, RoundOutcome], None] | None = None) -> list[RoundOutcome]:
    """Run the whole job with the task's training function; returns the per-round outcomes.

    A round the client's own privacy budget cannot afford (local DP with a target ε) is declined,
    not fatal: Opacus's accountant refuses it in ``privatize`` before any training, the client
    sits the round out (outcome ``"declined"``, logged with the ε figures) and keeps serving the
    job (final evaluation, job end). This happens when the server retries a round after an abort:
    the aborted attempt's local training really did use the data, so its ε stays spent (the
    accounting is never refunded) and the plan has no room for a second training of that round.

    An exception of a type in ``leave_round_on`` ends only the round it is raised in: the round
    iterator tells the server the site left it (a dropout at that stage), and the site serves the
    rest of the job (simulations inject dropouts this way, :mod:`fedveil.simulation.faults`).
    ``after_round(rnd, outcome)`` is called after each round the site trained and submitted (a
    simulation adds the plaintext update to its reference sums there).
    """
    with federation:
        for rnd in federation:
            try:
                outcome = train_round(rnd, task, dataset)
                if after_round is not None:
                    after_round(rnd, outcome)
            except BudgetExceededError as err:
                # a round whose parameters the policy refuses is not a spent budget (TrainingRefused)
                rnd.decline(f"local privacy budget exhausted: {err}",
                            out_of_budget=not isinstance(err, TrainingRefused))
            except leave_round_on as err:
                log.info("round %d: leaving it (%s)", rnd.number, err)
    return federation.history
