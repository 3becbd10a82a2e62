"""One error root: every exception class fedveil defines derives from ``fedveil.errors.FedveilError``,
keeps its builtin base (so ``except ValueError`` code still works), and carries ``field``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import fedveil
from fedveil.clients.policy import PolicyError
from fedveil.errors import FedveilError
from fedveil.secagg.errors import MalformedCredentialError, SecAggError


def fedveil_exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(fedveil.__path__, "fedveil."):
        if info.name.endswith("_pb2") or info.name.endswith("_pb2_grpc") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name):
                found[f"{info.name}.{name}"] = obj
    return list(found.values())


CLASSES = fedveil_exception_classes()


def test_the_walk_finds_the_package_errors() -> None:
    # a walk that imported nothing would pass the next test vacuously
    names = {cls.__name__ for cls in CLASSES}
    assert {"SecAggError", "PolicyViolation", "ServerConfigError", "BudgetExceededError", "StoreError"} <= names
    assert len(CLASSES) >= 40


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_fedveil_exception_derives_from_the_root(cls: type[BaseException]) -> None:
    assert issubclass(cls, FedveilError), f"{cls.__module__}.{cls.__name__} does not derive from FedveilError"


def test_builtin_bases_are_kept_and_field_is_carried() -> None:
    err = PolicyError("min_cohort", "must be at least 2 (got 1)")
    assert isinstance(err, ValueError) and isinstance(err, FedveilError)
    assert err.field == "min_cohort"
    cred = MalformedCredentialError("not_after", "must be later than not_before")
    assert isinstance(cred, SecAggError) and isinstance(cred, ValueError) and cred.field == "not_after"
    assert FedveilError("no field").field is None
    assert FedveilError("bad", field="rounds").field == "rounds"
