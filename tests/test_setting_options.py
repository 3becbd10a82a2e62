"""The click options built from a settings table (fedveil.commands.setting_options): every setting of
the job and site policy tables is exactly the generated option on its command (no hand-written copy),
the defaults a bare command line parses to are the config dataclasses' defaults, and each kind of
field (numbers, optional values, choices, repeated values, the four forms of a boolean) round-trips
from the table's command line back to the fields."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import click
import pytest

from fedveil.clients.policy import SitePolicy, build_policy
from fedveil.clients.policy_settings import POLICY_TABLE
from fedveil.commands.client import client_command
from fedveil.commands.server import server_command
from fedveil.commands.setting_options import table_options, value_type
from fedveil.errors import FedveilError
from fedveil.server.config import ServerConfig
from fedveil.server.job_settings import JOB_SETTINGS
from fedveil.settings_table import Setting, SettingsTable, setting

COMMANDS = [(server_command, JOB_SETTINGS, False), (client_command, POLICY_TABLE, True)]


def generated(table: SettingsTable, **kw: Any) -> dict[str, click.Parameter]:
    """The options ``table_options`` builds for ``table``, by parameter name."""

    @click.command()
    @table_options(table, **kw)
    def probe(**_: Any) -> None:
        """A command holding only the table's options."""

    return {p.name: p for p in probe.params if p.name is not None}


@pytest.mark.parametrize(("command", "table", "override"), COMMANDS, ids=["server", "client"])
def test_every_table_flag_is_the_generated_option_and_no_hand_written_one_repeats_it(
    command: click.Command, table: SettingsTable, override: bool
) -> None:
    flags = Counter(opt for p in command.params for opt in (*p.opts, *p.secondary_opts))
    params = {p.name: p for p in command.params}
    built = generated(table, flags_override=override)
    for s in table.settings:
        for flag in (s.flag, s.off_flag) if s.off_flag else (s.flag,):
            assert flags[flag] == 1, f"fedveil {command.name}: {flag} is {flags[flag]} options, not 1"
        assert s.parameter in params, f"fedveil {command.name} has no option for {s.field}"
        assert params[s.parameter].to_info_dict() == built[s.parameter].to_info_dict(), (
            f"fedveil {command.name} {s.flag} is not the option its table builds")
    assert len(params) == len(command.params), f"fedveil {command.name} has two options of one parameter"


def test_a_bare_server_command_line_parses_to_the_server_configs_defaults() -> None:
    context = server_command.make_context("server", ["--listen", "127.0.0.1:0", "--store", "unused.db"])
    parsed = JOB_SETTINGS.fields_from_options(context.params)
    required = {"task", "rounds", "clients_per_round", "min_clients"}
    assert {k: parsed[k] for k in required} == dict.fromkeys(required)
    reference = ServerConfig.from_flat(task="t", rounds=2, clients_per_round=3, min_clients=3).to_dict()
    assert {k: v for k, v in parsed.items() if k not in required} == {
        k: reference[k] for k in parsed if k not in required}


def test_a_bare_client_command_line_overrides_nothing_and_its_help_shows_the_policy_defaults() -> None:
    context = client_command.make_context("client", ["--server", "h:1", "--task", "t", "--data", "d.csv"])
    flags = POLICY_TABLE.fields_from_options(context.params)
    assert flags.pop("allowed_dp_modes") == () and flags.pop("local_accountants") == ()  # repeat flags: none given
    assert set(flags.values()) == {None}
    assert build_policy({}, trust_server=True, **{k: v for k, v in flags.items() if k != "trust_server"}) == \
        SitePolicy(trust_server=True)
    helps = {p.name: p.help or "" for p in client_command.params if isinstance(p, click.Option)}
    defaults = SitePolicy(trust_server=True)
    assert helps["min_cohort"].endswith(f"[default: {defaults.min_cohort}]")
    assert helps["max_attempts_per_round"].endswith(f"[default: {defaults.max_attempts_per_round}]")
    assert helps["security_bits"].endswith(f"[default: {defaults.security_bits:g}]")
    assert helps["evaluation"].endswith(f"[default: {defaults.evaluation}]")
    assert helps["max_corrupt_fraction"].endswith("[default: 1/3]")


@dataclass(frozen=True)
class Sample:
    count: int = 3
    limit: float | None = None
    mode: str = "b"
    tags: frozenset[str] = field(default_factory=frozenset)
    verbose: bool = False
    active: bool = True
    amplify: bool = False
    evaluate: bool = True
    weighted: bool = True


SAMPLE = SettingsTable(Sample, (
    setting("count", "s", show_default=True, help="How many."), setting("limit", "s"),
    setting("mode", "s", values=("a", "b", "c")), setting("tags", "s", values=("x", "y")),
    setting("verbose", "s"), Setting("active", "s", "--active", off_flag="--passive"),
    setting("amplify", "s", off_flag="--no-amplify"),
    Setting("evaluate", "s", "--no-evaluate", param="no_evaluate", negated=True),
    Setting("weighted", "s", "--weighting", param="weighting", choices=("examples", "uniform")),
), lambda message: FedveilError(message))


def sample_command(**kw: Any) -> click.Command:
    @click.command()
    @table_options(SAMPLE, **kw)
    def sample(**_: Any) -> None:
        """The sample table's options."""

    return sample


@pytest.mark.parametrize("config", [
    Sample(),
    Sample(count=7, limit=2.5, mode="c", tags=frozenset({"x", "y"}), verbose=True, active=False, amplify=True,
           evaluate=False, weighted=False),
], ids=["defaults", "every-field-changed"])
def test_each_kind_of_field_round_trips_through_its_generated_options(config: Sample) -> None:
    context = sample_command().make_context("sample", SAMPLE.command_line(config))
    fields = SAMPLE.fields_from_options(context.params)
    fields["tags"] = frozenset(fields["tags"])
    assert Sample(**fields) == config


def test_the_generated_options_take_their_types_choices_and_defaults_from_the_dataclass() -> None:
    params = generated(SAMPLE)
    assert isinstance(params["count"].type, click.types.IntParamType) and params["count"].default == 3
    assert isinstance(params["limit"].type, click.types.FloatParamType) and params["limit"].default is None
    assert isinstance(params["mode"].type, click.Choice) and list(params["mode"].type.choices) == ["a", "b", "c"]
    assert params["tags"].multiple and params["tags"].default == ()
    assert params["no_evaluate"].default is False and params["weighting"].default == "examples"
    assert params["active"].secondary_opts == ["--passive"] and params["active"].default is True
    with pytest.raises(click.BadParameter, match="'d' is not one of"):
        sample_command().make_context("sample", ["--mode", "d"])
    override = generated(SAMPLE, flags_override=True)
    assert {name: p.default for name, p in override.items()} == dict.fromkeys(override)
    assert (override["count"].help or "").endswith("How many.  [default: 3]")


def test_a_setting_without_a_command_line_form_is_refused_when_the_options_are_built() -> None:
    assert value_type(int | None) == (int, False) and value_type(frozenset[str]) == (str, True)
    with pytest.raises(TypeError, match="no command-line form"):
        value_type(dict[str, int])
    with pytest.raises(TypeError, match="for booleans, not int"):
        table_options(SettingsTable(Sample, (setting("count", "s", negated=True),), FedveilError))


def test_the_site_policy_page_lists_every_policy_setting_with_its_flag_and_default() -> None:
    """docs/site-policy.md's table is written by hand; this keeps it from drifting from the settings
    table the flags and the policy file are built from (a setting added, renamed or re-defaulted)."""
    import dataclasses
    from pathlib import Path

    from fedveil.clients.policy import SitePolicy
    from fedveil.clients.policy_settings import POLICY_SETTINGS

    page = (Path(__file__).resolve().parents[1] / "docs" / "site-policy.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in page.splitlines() if line.startswith("| `")}
    defaults = {f.name: f.default for f in dataclasses.fields(SitePolicy)}
    for entry in POLICY_SETTINGS:
        assert entry.field in rows, f"docs/site-policy.md has no row for policy setting {entry.field!r}"
        default_cell, flag_cell = rows[entry.field][0], rows[entry.field][1]
        assert entry.flag in flag_cell, f"{entry.field}: the page names {flag_cell!r}, not {entry.flag}"
        default = defaults[entry.field]
        if isinstance(default, bool):
            assert default_cell == str(default).lower(), f"{entry.field}: default {default_cell!r} on the page"
        elif isinstance(default, int | float) and entry.field != "max_corrupt_fraction":
            assert default_cell == f"{default:g}", f"{entry.field}: default {default_cell!r} on the page"
        elif isinstance(default, str):
            assert default_cell == default, f"{entry.field}: default {default_cell!r} on the page"
