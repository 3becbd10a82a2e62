"""``fedveil client``: join a federated job with local data (the turnkey client)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import click

from fedveil.clients.policy_settings import POLICY_TABLE
from fedveil.commands.common import (
    MAX_THREADS,
    eprint,
    fail,
    fail_from,
    file_key,
    finite_or_none,
    load_pinned_authority,
    print_json_last_line,
)
from fedveil.commands.log_format import configure_logging, log_format_option
from fedveil.commands.setting_options import table_options

EXIT_REFUSED = 3
EXIT_FAILED = 1


def register(group: click.Group) -> None:
    group.add_command(client_command)


@click.command("client")
@click.option("--server", required=True, help="The coordinator, HOST:PORT.")
@click.option("--task", "task_ref", required=True, help="The job's task, package.module[:attr].")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Local data: a CSV file in the task's schema. It never leaves this machine.")
@click.option("--token", default=None, help="Enrolment token from `fedveil enroll` (or set FEDVEIL_TOKEN).")
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="Read the token from this file (keeps it out of the process list).")
@click.option("--ca-cert", type=click.Path(path_type=Path), default=None,
              help="PEM CA certificate to verify the server's TLS certificate.")
@click.option("--client-cert", type=click.Path(path_type=Path), default=None,
              help="PEM certificate for mutual TLS (a server started with --client-ca); its CN is this client.")
@click.option("--client-key", type=click.Path(path_type=Path), default=None,
              help="PEM private key of --client-cert.")
@click.option("--insecure", is_flag=True, help="Plaintext connection, no TLS (loopback only; see below).")
@click.option("--allow-insecure-remote", is_flag=True,
              help="Allow --insecure to a server that is not on loopback (the token then travels in the clear).")
@click.option("--server-name", default=None, help="Expected name in the server's certificate, if not the host.")
@click.option("--identity-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM) for active-adversary jobs, e.g. from "
                   "`openssl genpkey -algorithm ed25519`.")
@click.option("--credential", type=click.Path(path_type=Path), default=None,
              help="This site's credential from the consortium authority (fedveil authority issue).")
@click.option("--authority", type=click.Path(path_type=Path), default=None,
              help="The consortium authority's public file to pin (fedveil authority init); every cohort "
                   "member must be vouched for by it. Required unless --trust-server.")
@click.option("--revocations", type=click.Path(path_type=Path), default=None,
              help="The authority's latest revocation list.")
@click.option("--roster", "roster_path", type=click.Path(path_type=Path), default=None,
              help="A roster the authority signed (fedveil authority roster): checked once at start, so the "
                   "credentials it lists cost no signature check in a round.")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="This site's security policy (TOML, [policy] table); the flags below override it.")
@table_options(POLICY_TABLE, flags_override=True)
@click.option("--state", "state_path", type=click.Path(path_type=Path), default=None,
              help="File where this site keeps its attempts, releases and own privacy ledger across restarts.")
@click.option("--seed", type=int, default=None,
              help="Seed of this site's data order. Keys, masks and noise always come from the OS.")
@click.option("--insecure-deterministic", is_flag=True,
              help="Derive keys, masks, rounding and noise from --seed too (tests only).")
@click.option("--give-up-after", type=float, default=300.0, show_default=True,
              help="Seconds to keep retrying an unreachable server before exiting.")
@click.option("--max-backoff", type=float, default=10.0, show_default=True,
              help="Longest wait between reconnection attempts, in seconds.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@log_format_option
def client_command(
    server: str, task_ref: str, data_path: Path, token: str | None, token_file: Path | None,
    ca_cert: Path | None, client_cert: Path | None, client_key: Path | None, insecure: bool,
    allow_insecure_remote: bool, server_name: str | None, identity_key: Path | None, credential: Path | None,
    authority: Path | None, revocations: Path | None, roster_path: Path | None,
    trust_server: bool | None, policy_path: Path | None, min_cohort: int | None,
    max_corrupt_fraction: float | None, allow_dp: tuple[str, ...], min_noise_multiplier: float | None,
    max_attempts_per_round: int | None, max_evaluations_per_round: int | None, security_bits: float | None,
    max_evaluations_per_job: int | None, evaluation: str | None, evaluate_under_local_dp: bool | None,
    max_local_epochs: int | None, max_local_delta: float | None, max_local_epsilon: float | None,
    min_local_noise_multiplier: float | None, max_lifetime_local_epsilon: float | None,
    allow_local_accountant: tuple[str, ...], max_user_epsilon: float | None,
    state_path: Path | None, seed: int | None,
    insecure_deterministic: bool, give_up_after: float,
    max_backoff: float, threads: int, log_level: str, log_format: str,
) -> int:
    """Join the job at --server with the local data in --data and train until the job is done.

    Only masked, encoded model updates leave this machine. The client reconnects with
    exponential backoff when the server is unreachable, and exits 0 when the job completes,
    3 when the server refuses its credentials, 1 on other failures.
    """
    from fedveil.clients.api import (
        IdentityKeyError,
        check_server_address,
        evaluator,
        federate,
        load_identity_key,
        run_client,
    )
    from fedveil.clients.backoff import BackoffPolicy
    from fedveil.clients.options import AuthenticationError, ClientError
    from fedveil.clients.site_state import SiteStateError
    from fedveil.clients.update import RoundConfigError
    from fedveil.protocol.auth import parse_token
    from fedveil.protocol.errors import ProtocolError, Unauthenticated
    from fedveil.protocol.identity_files import IdentityFileError, load_credential
    from fedveil.protocol.tls import TlsConfigError, plaintext_refusal
    from fedveil.task import SchemaError, TaskLoadError, load_task

    configure_logging(log_level, log_format, text_format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 1 <= threads <= MAX_THREADS:
        fail("--threads", f"must be between 1 and {MAX_THREADS} (got {threads})")
    import torch

    torch.set_num_threads(threads)
    try:
        check_server_address(server)
    except ValueError:
        fail("--server", f"expected HOST:PORT with a port in 1..65535 (got {server!r})")
    if allow_insecure_remote and not insecure:
        fail("--allow-insecure-remote", "only applies together with --insecure")
    refusal = plaintext_refusal(server, "--allow-insecure-remote") if insecure else None
    if refusal is not None:
        if not allow_insecure_remote:
            fail("--insecure", refusal)
        logging.getLogger("fedveil.client").warning(
            "--insecure to %s with --allow-insecure-remote: this client's token and updates travel unencrypted", server)
    if insecure and ca_cert is not None:
        fail("--insecure", "cannot be combined with --ca-cert (choose TLS or plaintext)")
    if insecure and (client_cert is not None or client_key is not None):
        fail("--insecure", "cannot be combined with --client-cert/--client-key (mutual TLS needs TLS)")
    if (client_cert is None) != (client_key is None):
        fail("--client-cert" if client_cert is None else "--client-key",
             "give --client-cert and --client-key together")
    if token is not None and token_file is not None:
        fail("--token-file", "give either --token or --token-file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            fail("--token-file", f"cannot read {str(token_file)!r}: {err.strerror}")
        if not token:  # never a silent fall-back to FEDVEIL_TOKEN, or to no token at all
            fail("--token-file", f"{str(token_file)!r} is empty")
    token_source = "--token-file" if token_file is not None else "--token"
    if not token and os.environ.get("FEDVEIL_TOKEN"):
        token, token_source = os.environ["FEDVEIL_TOKEN"], "FEDVEIL_TOKEN"
    token = token or None
    if token is not None:
        try:  # checked here so that a mistyped token fails at once, not after connection retries
            parse_token(token)
        except Unauthenticated as err:
            fail(token_source, str(err))  # the message never repeats the token
    if not (math.isfinite(give_up_after) and give_up_after >= 0):
        fail("--give-up-after", f"must be a finite number of seconds >= 0 (got {give_up_after})")
    if not (math.isfinite(max_backoff) and max_backoff >= 0.2):
        fail("--max-backoff", f"must be a finite number of seconds >= 0.2 (got {max_backoff})")
    if seed is not None and seed < 0:
        fail("--seed", f"must be non-negative (got {seed})")
    identity = None
    if identity_key is not None:
        try:
            identity = load_identity_key(identity_key)
        except IdentityKeyError as err:
            fail_from(err, "--identity-key")
    policy_flags = POLICY_TABLE.fields_from_options(click.get_current_context().params)
    policy_flags["allowed_dp_modes"] = policy_flags["allowed_dp_modes"] or None  # no --allow-dp: the file's
    policy_flags["local_accountants"] = policy_flags["local_accountants"] or None  # no --allow-local-accountant
    policy = _site_policy(policy_path, authority, revocations, roster_path, **policy_flags)
    site_credential = b""
    if credential is not None:
        try:
            site_credential = load_credential(credential).encode()
        except IdentityFileError as err:
            fail("--credential", str(err))
    try:
        task = load_task(task_ref)
    except TaskLoadError as err:
        fail_from(err, "--task")
    if not data_path.is_file():
        fail("--data", f"{str(data_path)!r} is a directory, not a data file" if data_path.is_dir()
             else f"no such file {str(data_path)!r}")
    try:
        dataset = task.load_dataset(data_path)
    except SchemaError as err:
        fail("--data", f"{data_path}: {err}")
    try:
        federation = federate(
            server,
            task=task,
            token=token,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
            allow_insecure_remote=allow_insecure_remote,
            seed=seed,
            num_examples=len(dataset),
            evaluate=evaluator(task, dataset),
            backoff=BackoffPolicy(max_delay_s=max(max_backoff, 0.2), give_up_after_s=give_up_after),
            server_name_override=server_name,
            identity_key=identity,
            credential=site_credential or None,
            policy=policy,
            state=state_path,
            insecure_deterministic=insecure_deterministic,
        )
    except TlsConfigError as err:
        fail_from(err, "--ca-cert")
    except SiteStateError as err:
        fail("--state", str(err))
    federation.options.revocations_path = revocations  # read again when replaced mid-job (the policy holds its list)
    try:
        history = run_client(federation, task, dataset)
    except AuthenticationError as err:
        eprint(f"error: {err}")
        return EXIT_REFUSED
    except (ClientError, ProtocolError, ConnectionError, RoundConfigError) as err:
        # RoundConfigError: e.g. local training diverged (NaN weights) under the server's settings
        eprint(f"error: {err}")
        return EXIT_FAILED
    for declined in (h for h in history if h.outcome == "declined"):
        eprint(f"warning: round {declined.round} declined: {declined.reason}")
    done = federation.job_done
    spend = federation.local_privacy
    print_json_last_line(
        {
            "client": federation.client_name,
            "run_id": done.run_id if done is not None else "",
            "rounds_joined": len(history),
            "rounds_completed": sum(1 for h in history if h.outcome == "completed"),
            "outcomes": [h.outcome for h in history],
            "reconnects": federation.reconnects,
            "local_epsilon": spend.epsilon if spend is not None else None,
            "site_user_epsilon": finite_or_none(federation.privacy.user_epsilon),
        }
    )
    return 0


def _site_policy(policy_path: Path | None, authority: Path | None, revocations: Path | None,
                 roster_path: Path | None, **flags: Any) -> Any:
    """The site's policy from --policy (TOML) and the flags; errors name the flag or TOML key at fault."""
    from fedveil.clients.policy import PolicyError, build_policy
    from fedveil.clients.policy_settings import load_policy_file, policy_flag

    settings: dict[str, Any] = {}
    if policy_path is not None:
        try:
            settings = load_policy_file(policy_path)
        except PolicyError as err:
            fail("--policy", err.detail)
    pinned, revoked = load_pinned_authority(authority, revocations)
    roster = None
    if roster_path is not None:
        from fedveil.protocol.identity_files import IdentityFileError, load_signed_roster

        try:  # checked against the pinned authority by the policy (an error naming --roster without one)
            roster = load_signed_roster(roster_path)
        except IdentityFileError as err:
            fail("--roster", str(err))
    try:
        return build_policy(settings, authority=(pinned.consortium, pinned.public_key.raw) if pinned else None,
                            revocations=revoked, roster=roster, **flags)
    except PolicyError as err:
        pinned_from = {"authority_public_key": "--authority", "revocations": "--revocations", "roster": "--roster"}
        where = (file_key("policy", err.field, "--policy", policy_path) if err.field in settings
                 else pinned_from.get(err.field) or policy_flag(err.field))
        fail(where or "--policy", err.detail)
