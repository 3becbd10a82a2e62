"""Names a package exports but imports only on first use (PEP 562), so that importing the package,
or a light module of it, loads none of its heavy dependencies (torch, gRPC)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, homes: Mapping[str, str],
                 names: Sequence[str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for exports imported on first use.

    ``homes`` maps each exported name to the module that defines it; a name once imported is kept
    as an attribute of the package. ``names``: the package's ``__all__``.
    """

    def getattr_(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return getattr_, dir_
