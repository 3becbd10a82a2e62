"""Click options built from a settings table (:mod:`fedveil.settings_table`): a command's flags, their
types, defaults, choices and help are written once, in the table.

Each :class:`~fedveil.settings_table.Setting` becomes one ``click.Option``. Its type is the field's
type hint (``int``, ``float``, ``str``; ``X | None`` as ``X``; a set of strings as a repeated
option), a string's ``values`` a ``click.Choice``; a boolean is a flag (``--a/--b`` with an
``off_flag``, the flag for False when ``negated``, or a choice between two words). Its default is
the dataclass's (:meth:`~fedveil.settings_table.SettingsTable.default_of`), shown in ``--help`` as
the setting says.

``flags_override=True`` (``fedveil client``, whose flags override its ``--policy`` file and
``build_policy`` ignores a None): every option's default is None, so only the flags given count;
``--help`` then shows the dataclass default as a label.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fedveil.settings_table import Setting, SettingsTable

F = TypeVar("F", bound=Callable[..., Any])


def table_options(table: SettingsTable, *, flags_override: bool = False) -> Callable[[F], F]:
    """A decorator adding one option per setting of ``table``, in the table's order (module docstring)."""
    options = [_option(table, s, flags_override=flags_override) for s in table.settings]

    def wrap(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


def _option(table: SettingsTable, s: Setting, *, flags_override: bool) -> Callable[[F], F]:
    kind, multiple = value_type(table.type_of(s.field))
    default = table.default_of(s.field)
    if kind is not bool and (s.choices is not None or s.negated or s.off_flag is not None):
        raise TypeError(f"{s.field}: choices, negated and off_flag are for booleans, not {kind.__name__}")
    kw: dict[str, Any] = {"help": s.help or None}
    if kind is bool and s.choices is not None:
        kw.update(type=click.Choice(list(s.choices)), default=s.choices[0] if default else s.choices[1])
    elif kind is bool:
        kw["default"] = (not default) if s.negated else default
        if s.off_flag is None:  # an --a/--b pair is a boolean flag to click already (is_flag would refuse it)
            kw["is_flag"] = True
    else:
        kw.update(type=click.Choice(list(s.values)) if s.values else kind, multiple=multiple,
                  default=tuple(sorted(default)) if multiple and default is not None else default)
    label = s.default_label or (_shown(kw["default"]) if flags_override and s.show_default else "")
    if flags_override:
        kw["default"] = None
    if label:
        kw["help"] = f"{s.help}  [default: {label}]" if s.help else f"[default: {label}]"
    else:
        kw["show_default"] = s.show_default
    name = f"{s.flag}/{s.off_flag}" if s.off_flag is not None else s.flag
    return click.option(name, s.parameter, **kw)


def value_type(hint: Any) -> tuple[type, bool]:
    """(the type of one value, whether the option repeats) for a setting's type hint."""
    origin = typing.get_origin(hint)
    if origin in (frozenset, set, list, tuple):
        return value_type(typing.get_args(hint)[0])[0], True
    if origin in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        if len(kinds) == 1:
            return value_type(kinds[0])
    if hint in (bool, int, float, str):
        return hint, False
    raise TypeError(f"no command-line form for a setting of type {hint!r}")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
