"""``fedveil init-model``: the job's model file from the user's own module, for ``fedveil server --model``.

    fedveil init-model --from mynet:Net --dp local --out init.safetensors

``--from`` names a class or a zero-argument factory (``module:attr``) importable where the command runs
(the operator's machine, with the sites' model code); the server then needs only the file.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from fedveil.commands.common import fail


def register(group: click.Group) -> None:
    group.add_command(init_model_command)


@click.command("init-model")
@click.option("--from", "factory", required=True, help="module:attr, a model class or a zero-argument factory.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the model file (.safetensors).")
@click.option("--dp", type=click.Choice(["none", "local", "central", "distributed"]), default="none",
              show_default=True, help="The job's DP mode; local makes the model DP-SGD-compatible first.")
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed for the initial values.")
def init_model_command(factory: str, out_path: Path, dp: str, seed: int) -> None:
    """Write the job's model file (names, shapes, dtypes, initial values) from your model's code."""
    import torch
    from torch import nn

    from fedveil.dp.compat import UnsupportedLayerError
    from fedveil.model_file import ModelFileError, save_initial_model

    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        fail("--from", f"expected module:attr (got {factory!r})")
    if "" not in sys.path and os.getcwd() not in sys.path:  # a module beside you, as `python -m` finds it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        fail("--from", f"cannot import module {module_name!r}: {err}")
    make = getattr(module, attr, None)
    if make is None or not callable(make):
        fail("--from", f"module {module_name!r} has no callable {attr!r}")
    torch.manual_seed(seed)
    try:
        model = make()
    except TypeError as err:
        fail("--from", f"{factory} cannot be called without arguments ({err})")
    if not isinstance(model, nn.Module):
        fail("--from", f"{factory} returned a {type(model).__name__}, not a torch nn.Module")
    try:
        saved = save_initial_model(model, out_path, dp=dp)
    except UnsupportedLayerError as err:
        fail("--from", str(err))
    except ModelFileError as err:
        fail("--out" if err.field == "path" else "--from", str(err))
    from fedveil.model_spec import ModelSpec

    spec = ModelSpec.of(saved)
    click.echo(f"wrote {str(out_path)!r}: {len(spec.tensors)} tensors, {spec.size} values (dp: {dp}); "
               f"start the job with fedveil server --model {out_path}")
