"""One table of settings used in both directions, for every configuration a command line sets.

A :class:`SettingsTable` lists a dataclass's settings once: the section of a TOML file each belongs
to, its command-line flag and that flag's help. From that one list it reads parsed flags into
fields, writes the flags that rebuild a configuration, reads a TOML file key by key (an unknown
section or key, or a value of the wrong type, is refused naming ``section.key``), writes such a file
back, and names the flag of a field for an error message; the commands build their click options
from it too (:mod:`fedveil.commands.setting_options`: type from the field's type, default from the
dataclass's), so no flag is written twice. The job (``fedveil server --config job.toml``,
:mod:`fedveil.server.job_settings`) and the site policy (``fedveil client --policy site.toml``,
:mod:`fedveil.clients.policy_settings`) are two tables of this kind, so the flag names, the file
keys and the messages cannot drift apart. Pure module: file reading is the caller's ``Path``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedveil.errors import FedveilError


@dataclass(frozen=True)
class Setting:
    """One field: its file section, its command-line parameter and flags, and the flag's ``--help``.

    The option's type and default are the field's (its type hint and its dataclass default); what a
    type cannot say is here: the values a string takes, and how ``--help`` shows the default.
    """

    field: str
    section: str
    flag: str
    param: str = ""
    """The click parameter name (default: the field)."""
    off_flag: str | None = None
    """A boolean's flag for False (``--passive``); None: False is the flag's absence."""
    negated: bool = False
    """The flag sets the field to False (``--no-evaluate``)."""
    choices: tuple[str, str] | None = None
    """A boolean given as a choice: (value for True, value for False)."""
    help: str = ""
    values: tuple[str, ...] = ()
    """The values a string setting (or each item of a set of strings) takes; empty: any."""
    show_default: bool = False
    """``--help`` shows the default."""
    default_label: str = ""
    """How ``--help`` shows a default that is not a plain value (``1/3``, ``K``); implies showing it."""

    @property
    def parameter(self) -> str:
        return self.param or self.field


def setting(field: str, section: str, **kw: Any) -> Setting:
    """A setting whose flag is its field name with dashes (``dp_clip`` → ``--dp-clip``)."""
    return Setting(field, section, "--" + field.replace("_", "-"), **kw)


def field_defaults(target: type) -> dict[str, Any]:
    """The default of each field of the dataclass ``target`` (None for a field without one)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(target):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


ErrorFactory = Callable[[str], FedveilError]
"""Builds the table's error from a message that names ``section.key`` (or the file)."""


class SettingsTable:
    """The settings of ``target`` (a dataclass) that a file or flags can give (see the module docstring).

    ``bare_section``: a file may also give that section's keys at its top level (a site policy file
    with or without its ``[policy]`` header). ``field_types``, ``defaults`` and ``values_of``: the
    settings' types, their defaults (None: the job must give it) and a config's values by setting
    name, for a config whose settings are not its own fields (a composed one; default: ``target``'s
    dataclass fields).
    """

    def __init__(self, target: type, settings: tuple[Setting, ...], error: ErrorFactory, *,
                 bare_section: str | None = None, field_types: Mapping[str, Any] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 values_of: Callable[[Any], Mapping[str, Any]] | None = None) -> None:
        self.target = target
        self.settings = settings
        self.sections = tuple(dict.fromkeys(s.section for s in settings))
        self._error = error
        self._bare_section = bare_section
        self._by_field = {s.field: s for s in settings}
        self._types = dict(field_types) if field_types is not None else typing.get_type_hints(target)
        self._defaults = dict(defaults) if defaults is not None else field_defaults(target)
        self._values_of = values_of or _dataclass_values
        unknown = [s.field for s in settings if s.field not in self._types or s.field not in self._defaults]
        if unknown:
            raise TypeError(f"{target.__name__} has no field(s) {unknown}")

    def type_of(self, field: str) -> Any:
        """The type hint of a setting (``int``, ``float | None``, ``frozenset[str]`` ...)."""
        return self._types[field]

    def default_of(self, field: str) -> Any:
        """A setting's default (None where there is none: the command or the file must give it)."""
        return self._defaults[field]

    def flag_of(self, field: str) -> str | None:
        """The flag that sets ``field`` (None: no flag does)."""
        found = self._by_field.get(field)
        return found.flag if found is not None else None

    def section_of(self, field: str) -> str | None:
        found = self._by_field.get(field)
        return found.section if found is not None else None

    def fields_from_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The fields the parsed options give (``options``: click's params by parameter name; None stays
        None: a flag not given where flags only override)."""
        out: dict[str, Any] = {}
        for s in self.settings:
            value = options[s.parameter]
            if value is None:
                pass
            elif s.choices is not None:
                value = value == s.choices[0]
            elif s.negated:
                value = not value
            out[s.field] = value
        return out

    def command_line(self, config: Any) -> list[str]:
        """The flags that rebuild ``config``'s settings (floats in full precision)."""
        argv: list[str] = []
        values = self._values_of(config)
        for s in self.settings:
            value = values[s.field]
            if s.choices is not None:
                argv += [s.flag, s.choices[0] if value else s.choices[1]]
            elif isinstance(value, bool):
                if s.negated:
                    argv += [] if value else [s.flag]
                elif value:
                    argv.append(s.flag)
                elif s.off_flag is not None:
                    argv.append(s.off_flag)
            elif isinstance(value, (frozenset, set, list, tuple)):
                for item in sorted(value):
                    argv += [s.flag, str(item)]
            elif value is not None and value != "":
                argv += [s.flag, repr(value) if isinstance(value, float) else str(value)]
        return argv

    def load_file(self, path: str | Path) -> dict[str, Any]:
        """The fields a TOML file sets, checked key by key."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as err:
            raise self._error(f"cannot read {str(p)!r}: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise self._error(f"{str(p)!r} is not valid TOML: {err}") from None
        if self._bare_section is not None and not any(isinstance(v, dict) for v in data.values()):
            data = {self._bare_section: data}
        out: dict[str, Any] = {}
        for section, table in data.items():
            if section not in self.sections or not isinstance(table, dict):
                raise self._error(f"{section}: unknown section (expected one of {', '.join(self.sections)})")
            for key, value in table.items():
                found = self._by_field.get(key)
                if found is None or found.section != section:
                    known = ", ".join(s.field for s in self.settings if s.section == section)
                    raise self._error(f"{section}.{key}: unknown key (section {section} takes {known})")
                out[key] = self._checked(f"{section}.{key}", key, value)
        return out

    def file_text(self, config: Any) -> str:
        """A TOML file holding ``config``'s settings (the inverse of :meth:`load_file`)."""
        lines: list[str] = []
        values = self._values_of(config)
        for section in self.sections:
            lines.append(f"[{section}]")
            for s in (s for s in self.settings if s.section == section):
                value = values[s.field]
                if value is None:
                    continue
                lines.append(f"{s.field} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def config_fields(self, config: Any) -> dict[str, Any]:
        """The fields of ``config`` the table covers (others come from elsewhere, e.g. a pinned key)."""
        return {name: value for name, value in self._values_of(config).items() if name in self._by_field}

    def _checked(self, where: str, field: str, value: Any) -> Any:
        hint = self._types[field]
        if typing.get_origin(hint) in (frozenset, set, list, tuple):
            (item_type,) = typing.get_args(hint)[:1] or (str,)
            if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
                raise self._error(f"{where}: expected a list of {item_type.__name__}, got {value!r}")
            return frozenset(value) if typing.get_origin(hint) is frozenset else value
        kinds = tuple(k for k in (typing.get_args(hint) or (hint,)) if isinstance(k, type) and k is not type(None))
        expected = " or ".join(k.__name__ for k in kinds)
        if isinstance(value, bool) and bool not in kinds:
            raise self._error(f"{where}: expected {expected}, got a boolean")
        if isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
            return float(value)
        if not isinstance(value, kinds):
            raise self._error(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
        return value


def _dataclass_values(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (frozenset, set, list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in sorted(value)) + "]"
    return repr(value)
