"""``fedveil dashboard``: the read-only web dashboard of a run store, after (or beside) its server.

``fedveil server --dashboard PORT`` serves the same view while the job runs and stops with it;
this command keeps a finished run's rounds, privacy spend and prediction page available until
Ctrl+C.
"""

from __future__ import annotations

from pathlib import Path

import click

from fedveil.commands.common import dashboard_token_option, fail, fail_from, read_dashboard_token


def register(group: click.Group) -> None:
    group.add_command(dashboard_command)


@click.command(name="dashboard")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True,
              help="The run store (SQLite) a fedveil server wrote.")
@click.option("--task", "task_ref", required=True, help="The job's task, e.g. fedveil.demo.healthcare:task.")
@click.option("--port", type=int, default=8050, show_default=True, help="Serve on 127.0.0.1:PORT (0: any free port).")
@dashboard_token_option
def dashboard_command(store_path: Path, task_ref: str, port: int, dashboard_token_file: Path | None) -> None:
    """Serve the read-only dashboard of --store on 127.0.0.1 until Ctrl+C.

    Prints the login URL (with its token) once; open it to log in."""
    from fedveil.server.dashboard import start_store_dashboard
    from fedveil.server.store import StoreError
    from fedveil.task import TaskLoadError, load_task

    if not 0 <= port <= 65535:
        fail("--port", f"must be a TCP port in 0..65535 (got {port})")
    if not store_path.is_file():
        fail("--store", f"no run store at {str(store_path)!r}")
    try:
        task = load_task(task_ref)
    except TaskLoadError as err:
        fail_from(err, "--task")
    token = read_dashboard_token(dashboard_token_file)
    try:
        server = start_store_dashboard(store_path, task, port, token=token)
    except StoreError as err:
        fail("--store", str(err))
    except OSError as err:
        fail("--port", f"cannot listen on port {port}: {err.strerror or err}")
    try:
        server.serve_until_signalled(lambda: click.echo(f"dashboard: {server.login_url} (read only; Ctrl+C to stop)"))
    finally:
        server.stop()
