"""``fedveil export``: write a run's global model at a round as safetensors, ONNX or a torch file.

``fedveil export --store run.db [--run ID] [--round N] --format safetensors|onnx|torch --out FILE``
(the latest run and its latest round by default) prints what it wrote, and with ``--json`` the
metadata as the last line. See :mod:`fedveil.server.model_export`.
"""

from __future__ import annotations

from pathlib import Path

import click

from fedveil.commands.common import fail, print_json_last_line


@click.command("export")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="The run store (SQLite file).")
@click.option("--run", "run_id", default=None, help="The run to export [default: the latest].")
@click.option("--round", "round_number", type=int, default=None,
              help="The round whose global model to export (0: the initial model) [default: the latest].")
@click.option("--format", "file_format", type=click.Choice(["safetensors", "onnx", "torch"]), required=True,
              help="safetensors (with metadata), onnx (needs the 'export' extra) or torch (torch.save).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as one JSON object (last line).")
def export_command(store: Path, run_id: str | None, round_number: int | None, file_format: str, out: Path,
                   as_json: bool) -> None:
    """Write the global model of a run at a round, with its run, round, ε and task as metadata."""
    from fedveil.server.model_export import ExportError, ExportRequest, export_model

    try:
        exported = export_model(ExportRequest(store=store, out=out, format=file_format, run_id=run_id,
                                              round=round_number))
    except ExportError as err:
        fail(f"--{err.field or 'store'}", str(err))
    meta = exported.metadata
    epsilon = "" if meta["epsilon"] == "none" else f", user-level ε={float(meta['epsilon']):.4g}"
    click.echo(f"wrote {file_format} {str(out)!r}: run {meta['run_id']}, round {meta['round']}, "
               f"task {meta['task']}{epsilon}")
    if as_json:
        print_json_last_line({"out": str(out), "format": file_format, **meta})


def register(group: click.Group) -> None:
    group.add_command(export_command)
