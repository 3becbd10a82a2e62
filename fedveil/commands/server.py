"""``fedveil enroll`` and ``fedveil server``: enrol clients, run a federated training job.

- ``fedveil enroll --store PATH --name NAME`` creates the store if needed, enrols the client and
  prints its token as the last line (shown once; the store keeps only its SHA-256 digest).
- ``fedveil server --listen HOST:PORT --store PATH --task T --rounds R --clients-per-round K
  --min-clients M [...] (--tls-cert C --tls-key K | --insecure)`` runs the job and prints a
  summary; the same command resumes it after a crash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from fedveil.commands.common import (
    USAGE_EXIT_CODE,
    dashboard_token_option,
    eprint,
    exit_within,
    fail,
    fail_from,
    file_key,
    flag_of,
    load_pinned_authority,
    print_json_last_line,
    read_dashboard_token,
)
from fedveil.commands.log_format import configure_logging, log_format_option
from fedveil.commands.setting_options import table_options
from fedveil.server.job_settings import JOB_SETTINGS, JobFileError, fields_from_options, load_job_file

EXIT_FAILED = 1
log = logging.getLogger("fedveil.server")
EXIT_STOPPED = 130


def _check_listen(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        fail("--listen", f"expected HOST:PORT with a port in 0..65535 (got {listen!r})")
    return listen


def _store_path(store: str) -> Path:
    path = Path(store)
    if path.exists() and path.is_dir():
        fail("--store", f"{store!r} is a directory; give a file path such as {str(path / 'run.db')!r}")
    if not path.parent.exists():
        fail("--store", f"directory {str(path.parent)!r} does not exist")
    return path


@click.command("enroll")
@click.option("--store", required=True, help="Run store (SQLite file; created if missing).")
@click.option("--name", required=True, help="The client's name (letters, digits, '.', '_', '-').")
@click.option("--rotate", is_flag=True, help="Issue a new token for an enrolled client and revoke its old ones.")
@click.option("--revoke", is_flag=True, help="Revoke the client: its tokens stop working at once.")
@click.option("--identity-public-key", default=None,
              help="Hex Ed25519 public key of the client (active-adversary mode).")
def enroll_command(store: str, name: str, rotate: bool, revoke: bool, identity_public_key: str | None) -> None:
    """Enrol a client and print its access token (last line)."""
    from fedveil.server.store import EnrollmentError, RunStore, StoreError

    path = _store_path(store)
    if revoke:
        if rotate or identity_public_key is not None:
            fail("--revoke", "cannot be combined with --rotate or --identity-public-key")
        if not path.exists():
            fail("--store", f"{store!r} does not exist")
        try:
            with RunStore(path) as run_store:
                run_store.revoke(name)
        except EnrollmentError as err:
            fail("--name", str(err))
        except StoreError as err:
            fail("--store", str(err))
        click.echo(f"revoked client {name!r} in {str(path)!r}; its tokens are refused from now on")
        return
    key: bytes | None = None
    if identity_public_key is not None:
        try:
            key = bytes.fromhex(identity_public_key)
        except ValueError:
            fail("--identity-public-key", f"not hexadecimal (got {identity_public_key[:16]!r}...)")
        if len(key) != 32:
            fail("--identity-public-key", f"expected 32 bytes (64 hex digits), got {len(key)} bytes")
    try:
        with RunStore(path) as run_store:
            issued = run_store.enroll(name, rotate=rotate, identity_public_key=key)
    except EnrollmentError as err:
        fail("--identity-public-key" if err.field == "identity_public_key" else "--name", str(err))
    except StoreError as err:
        fail("--store", str(err))
    action = "issued a new token for" if rotate else "enrolled"
    click.echo(f"{action} client {name!r} in {str(path)!r}; the token below is shown once "
               "(the store keeps only its SHA-256 digest):")
    click.echo(issued.token)


def _job_fields(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The job's config fields: the flags (fedveil.server.job_settings's table), over the job file; and
    how errors name each field the file set (``section.key in --config FILE``)."""
    named: dict[str, str] = {}
    fields = fields_from_options(opts)
    if opts["config_path"] is not None:
        try:
            from_file = load_job_file(opts["config_path"])
        except JobFileError as err:
            fail_from(err, "--config")
        context = click.get_current_context()
        for setting in JOB_SETTINGS.settings:
            given = context.get_parameter_source(setting.parameter) not in (ParameterSource.DEFAULT, None)
            if setting.field in from_file and not given:
                fields[setting.field] = from_file[setting.field]
                named[setting.field] = file_key(setting.section, setting.field, "--config", opts["config_path"])
    fields["task"], fields["model"] = fields["task"] or "", fields["model"] or ""
    if bool(fields["task"]) == bool(fields["model"]):
        fail("--model" if fields["model"] else "--task",
             "give the job's model file (--model) or a task (--task), one of the two (or model or task in the "
             "[job] section of --config)")
    for name in ("rounds", "clients_per_round"):
        if fields[name] is None:
            fail("--" + name.replace("_", "-"), f"required: give the flag, or {name} in the [job] section of --config")
    if fields["min_clients"] is None:
        fields["min_clients"] = fields["clients_per_round"]
    return fields, named


@click.command("server")
@click.option("--listen", required=True, help="HOST:PORT to listen on (port 0: any free port).")
@click.option("--store", required=True, help="Run store (SQLite file, created if missing).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A job file (TOML, sections job/schedule/secagg/privacy/training/evaluation, keys named as "
                   "the flags with '_'); flags given on the command line override it.")
@table_options(JOB_SETTINGS)
@click.option("--authority", "authority_path", default=None, type=click.Path(path_type=Path),
              help="The consortium authority's public file (fedveil authority init): site credentials are "
                   "checked at Join and at each cohort draw, and the consortium is announced to sites. "
                   "Required in active-adversary mode (the default).")
@click.option("--revocations", "revocations_path", default=None, type=click.Path(path_type=Path),
              help="The authority's signed revocation list, for the credential checks; read again whenever "
                   "the file changes (replace it with a newer list to revoke a site mid-job).")
@click.option("--tls-cert", default=None, help="Server certificate (PEM).")
@click.option("--tls-key", default=None, help="Server private key (PEM).")
@click.option("--client-ca", default=None, help="CA (PEM) of client certificates: turns on mutual TLS.")
@click.option("--insecure", is_flag=True, help="No TLS (loopback trials only; see --allow-insecure-remote).")
@click.option("--allow-insecure-remote", is_flag=True,
              help="Allow --insecure on an address that is not loopback (tokens then travel in the clear).")
@click.option("--max-message-mb", type=float, default=None, help="Inbound message limit [default: from the model].")
@click.option("--new-run", is_flag=True, help="Start a new run even if the store holds an unfinished one.")
@click.option("--port-file", default=None, help="Write the bound port to this file once listening.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (last line).")
@click.option("--dashboard", "dashboard_port", type=int, default=None, metavar="PORT",
              help="Serve the web dashboard (runs, rounds, privacy, predictions) on 127.0.0.1:PORT; "
                   "its login URL is printed once.")
@dashboard_token_option
@click.option("--metrics-port", type=int, default=0, show_default=True, metavar="PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: off).")
@click.option("--metrics-host", default=None, metavar="ADDRESS",
              help="Address the metrics endpoint binds [default: 127.0.0.1]; the metrics show the job's progress "
                   "and ε to whoever can reach it.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@log_format_option
def server_command(**opts: Any) -> NoReturn:
    """Run a federated training job: enrolment checks, cohorts, secure aggregation, DP, store.

    Once the job has run the command ends its process (see ``exit_within``): 0 when the job
    completed or spent its privacy budget, 130 when a signal stopped it, 1 when it failed."""
    from fedveil.model_file import ModelFileError, model_file_task
    from fedveil.protocol.tls import TlsConfigError, plaintext_refusal, read_pem
    from fedveil.server.config import ServerConfig, ServerConfigError
    from fedveil.server.coordinator import JobError
    from fedveil.server.observability import ObservabilityConfig, ObservabilityConfigError
    from fedveil.server.prometheus_metrics import MetricsEndpointError
    from fedveil.server.runner import TlsSettings, serve
    from fedveil.server.store import StoreError
    from fedveil.task import TaskLoadError, load_task

    configure_logging(opts["log_level"], opts["log_format"])
    listen = _check_listen(opts["listen"])
    if opts["metrics_host"] is not None and not opts["metrics_port"]:
        fail("--metrics-host", "only applies together with --metrics-port PORT")
    try:
        observability = ObservabilityConfig(metrics_port=opts["metrics_port"],
                                            metrics_host=opts["metrics_host"] or "127.0.0.1")
    except ObservabilityConfigError as err:
        fail(f"--{(err.field or 'metrics_port').replace('_', '-')}", str(err))
    store = _store_path(opts["store"])
    tls: TlsSettings | None = None
    if opts["allow_insecure_remote"] and not opts["insecure"]:
        fail("--allow-insecure-remote", "only applies together with --insecure")
    if opts["insecure"]:
        if opts["tls_cert"] or opts["tls_key"] or opts["client_ca"]:
            fail("--insecure", "cannot be combined with --tls-cert/--tls-key/--client-ca")
        refusal = plaintext_refusal(listen, "--allow-insecure-remote")
        if refusal is not None:
            if not opts["allow_insecure_remote"]:
                fail("--insecure", refusal)
            log.warning("--insecure on %s with --allow-insecure-remote: client tokens and model updates travel "
                        "unencrypted; anyone on the network path can read them", listen)
    else:
        if not opts["tls_cert"] or not opts["tls_key"]:
            fail("--tls-cert", "give --tls-cert and --tls-key, or --insecure to run without TLS")
        try:
            tls = TlsSettings(
                read_pem(opts["tls_cert"], "tls_cert"), read_pem(opts["tls_key"], "tls_key"),
                read_pem(opts["client_ca"], "client_ca") if opts["client_ca"] else None,
            )
        except TlsConfigError as err:
            fail_from(err, "--tls-cert")
    fields, named = _job_fields(opts)

    def where(flag: str) -> str:  # a refused value from the job file is named as the file names it
        return named.get(flag[2:].replace("-", "_"), flag)

    if fields["model"]:
        try:
            task = model_file_task(fields["model"])
        except ModelFileError as err:
            fail("--model", str(err))
    else:
        try:
            task = load_task(fields["task"])
        except TaskLoadError as err:
            fail_from(err, "--task")
    authority, revocations = _load_authority(opts["authority_path"], opts["revocations_path"])
    try:
        config = ServerConfig.from_flat(
            **fields,
            consortium=authority[0] if authority else "", authority_public_key=authority[1].hex() if authority else "",
        )
    except ServerConfigError as err:
        fail(where(err.flag), err.detail)
    max_bytes = None
    if opts["max_message_mb"] is not None:
        if not 1 <= opts["max_message_mb"] < 2048:  # gRPC takes the byte limit as a C int (< 2 GiB)
            fail("--max-message-mb", f"must be at least 1 and below 2048 (got {opts['max_message_mb']})")
        max_bytes = int(opts["max_message_mb"] * 1024 * 1024)
    dashboard = None
    if opts["dashboard_token_file"] is not None and opts["dashboard_port"] is None:
        fail("--dashboard-token-file", "only applies together with --dashboard PORT")
    try:
        config.check_serving()  # active-adversary mode needs --authority
    except ServerConfigError as err:
        fail(where(err.flag), err.detail)
    if opts["dashboard_port"] is not None:
        from fedveil.server.dashboard import start_store_dashboard

        if not 0 <= opts["dashboard_port"] <= 65535:
            fail("--dashboard", f"must be a TCP port in 0..65535 (got {opts['dashboard_port']})")
        token = read_dashboard_token(opts["dashboard_token_file"])
        try:
            dashboard = start_store_dashboard(store, task, opts["dashboard_port"], token=token)
        except OSError as err:
            fail("--dashboard", f"cannot listen on port {opts['dashboard_port']}: {err}")
        click.echo(f"dashboard: {dashboard.login_url}")  # the console only: the URL carries the login token
    # From here on the gRPC server has run: the command ends its process with exit_within, so that
    # no thread left behind (a handler a peer holds open) can keep a finished server alive.
    try:
        summary = serve(
            config, task, store, listen, tls=tls, new_run=opts["new_run"], max_message_bytes=max_bytes,
            port_file=Path(opts["port_file"]) if opts["port_file"] else None, revocations=revocations,
            observability=observability, revocations_path=opts["revocations_path"],
        )
    except MetricsEndpointError as err:
        eprint(f"error: --metrics-port: {err}")
        code = USAGE_EXIT_CODE
    except (JobError, StoreError, OSError, ValueError) as err:
        # ValueError: parameters the job cannot run with, e.g. an overflowing encoding
        flag = ("--store: " if isinstance(err, StoreError) else "--listen: " if isinstance(err, OSError)
                else f"{named.get(err.field, flag_of(err.field, ''))}: "
                if isinstance(err, JobError) and err.field else "")
        eprint(f"error: {flag}{err}")
        code = USAGE_EXIT_CODE
    else:
        _print_summary(summary.to_dict(), as_json=opts["as_json"])
        code = 0 if summary.status in ("completed", "budget_exhausted") else (
            EXIT_STOPPED if summary.status == "stopped" else EXIT_FAILED)
    finally:
        if dashboard is not None:
            dashboard.stop()
    exit_within(code)


def _load_authority(authority_path: Path | None, revocations_path: Path | None) -> tuple[Any, Any]:
    """(consortium, authority public key) from ``--authority`` and the revocation list, or Nones."""
    pinned, revocations = load_pinned_authority(authority_path, revocations_path)
    return ((pinned.consortium, pinned.public_key.raw) if pinned is not None else None), revocations


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    lines = [
        f"run {summary['run_id']}: {summary['status']} ({summary['message']})",
        f"  rounds completed: {summary['completed_rounds']}/{summary['total_rounds']}"
        + (f", resumed after round {summary['resumed_from']}" if summary["resumed_from"] else ""),
        f"  aborted round attempts: {summary['aborted_attempts']}, dropouts: {summary['dropouts']}",
    ]
    for name, why in sorted((summary.get("convicted") or {}).items()):
        lines.append(f"  convicted, left out of the rest of the run: {name} ({why})")
    lifted = set(summary.get("bars_lifted") or ())
    for name, why in sorted((summary.get("barred") or {}).items()):
        if name in lifted:
            lines.append(f"  barred, lifted when it joined again with another credential: {name} ({why})")
        else:
            lines.append(f"  barred while it presents the credential the sites refused: {name} ({why})")
    for name, why in sorted((summary.get("out_of_budget") or {}).items()):
        lines.append(f"  out of its own privacy budget, not drawn again: {name} ({why})")
    if summary["final_metrics"]:
        lines.append("  final evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in summary["final_metrics"].items()))
    if summary["epsilon"] is not None:
        lines.append(f"  user-level privacy: ε={summary['epsilon']:.4g} at δ={summary['delta']:g}")
    sites: dict[str, float] = summary.get("site_epsilon") or {}
    if sites:  # local DP: each site's DP-SGD spend, recomputed from the parameters it reported
        unverified = set(summary.get("unverified_sites") or ())
        lines.append(f"  sample-level privacy (sites' DP-SGD, from their reports): max ε={max(sites.values()):.4g}; "
                     + ", ".join(f"{name} ε={eps:.4g}" + (" (unverified)" if name in unverified else "")
                                 for name, eps in sorted(sites.items())))
    for line in lines:
        click.echo(line)
    if as_json:
        print_json_last_line(json.loads(json.dumps(summary)))


def register(group: click.Group) -> None:
    group.add_command(enroll_command)
    group.add_command(server_command)
