"""The ``fedveil`` command: one entry point, with subcommands registered by ``fedveil.commands``."""

from __future__ import annotations

import importlib
import sys

import click

from fedveil.commands.common import USAGE_EXIT_CODE, eprint

# Each module defines ``register(group: click.Group) -> None``. Add a line when a command group lands.
COMMAND_MODULES: tuple[str, ...] = (
    "fedveil.commands.budget",
    "fedveil.commands.bench",
    "fedveil.commands.server",
    "fedveil.commands.export",
    "fedveil.commands.client",
    "fedveil.commands.simulate",
    "fedveil.commands.bench_network",
    "fedveil.commands.bench_simulate",
    "fedveil.commands.bench_load",
    "fedveil.commands.demo",
    "fedveil.commands.dashboard",
    "fedveil.commands.authority",
    "fedveil.commands.identity",
    "fedveil.commands.model",
)


@click.group(name="fedveil", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedveil")
def cli() -> None:
    """Privacy-preserving federated learning: secure aggregation and differential privacy."""


def build_cli() -> click.Group:
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(cli)
    return cli


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Usage errors print one line on stderr and exit with status 2."""
    group = build_cli()
    try:
        result = group.main(args=argv, prog_name="fedveil", standalone_mode=False)
    except click.UsageError as err:
        eprint(f"error: {err.format_message()}")
        return USAGE_EXIT_CODE
    except click.exceptions.Exit as err:
        return int(err.exit_code)
    except click.ClickException as err:
        eprint(f"error: {err.format_message()}")
        return err.exit_code
    except click.Abort:
        eprint("aborted")
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
