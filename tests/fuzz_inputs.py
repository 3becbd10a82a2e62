"""Hypothesis strategies for fuzzing what a malicious site or a stranger can send.

Protobuf requests are fuzzed by *editing* a real request an honest site sent (so that the
session, sequence number, run and round nonce can be right and the edit reaches deep checks),
with values chosen per field type from the descriptor: extremes of every integer type, NaN and
infinities, empty / oversized / random bytes and strings, unknown enum values, and repeated
fields emptied or stuffed. Dashboard requests are random methods, paths, queries, headers and
bodies around the real API routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers_in(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Mostly edge values (0, ±1, the type's bounds, powers of two), some uniform."""
    edges = sorted({v for v in (0, 1, -1, 2, 7, 255, 256, 65535, 2**31 - 1, 2**32 - 1, 2**53, 2**63 - 1, lo, hi,
                                lo + 1, hi - 1) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 5e-324, 1e-12, 1e300, float("inf"), float("-inf"), float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
BYTES = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 32, b"\xff" * 65, b"\x00" * 70_000]))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "../../etc/passwd", "x" * 5000, "\x00", "é" * 300]))


def scalar_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        return integers_in(*_INT_RANGES[field.type])
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if field.type == FieldDescriptor.TYPE_FLOAT:
            return FLOATS.filter(lambda v: v != v or abs(v) < 3.4e38 or abs(v) == float("inf"))
        return FLOATS
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return BYTES
    return TEXT


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def field_paths(descriptor: Descriptor, depth: int = 3) -> list[tuple[str, ...]]:
    """Every field reachable from ``descriptor`` through singular message fields, ``depth`` deep."""
    paths: list[tuple[str, ...]] = []
    for field in descriptor.fields:
        paths.append((field.name,))
        if (field.type == FieldDescriptor.TYPE_MESSAGE and depth > 1
                and not _repeated(field)):
            paths += [(field.name, *rest) for rest in field_paths(field.message_type, depth - 1)]
    return paths


def _field_at(descriptor: Descriptor, path: Sequence[str]) -> FieldDescriptor:
    for name in path[:-1]:
        descriptor = descriptor.fields_by_name[name].message_type
    return descriptor.fields_by_name[path[-1]]


def edit_for(descriptor: Descriptor, path: tuple[str, ...]) -> st.SearchStrategy[tuple[tuple[str, ...], Any]]:
    field = _field_at(descriptor, path)
    value: st.SearchStrategy[Any]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        # clear it, or (repeated) add empty or duplicated elements
        value = st.sampled_from(["clear", "empty", "stuff"])
    elif _repeated(field):
        value = st.lists(scalar_values(field), max_size=6).map(lambda v: ("list", v))
    else:
        value = scalar_values(field)
    return st.tuples(st.just(path), value)


def edits(descriptor: Descriptor, max_edits: int = 3) -> st.SearchStrategy[list[tuple[tuple[str, ...], Any]]]:
    paths = field_paths(descriptor)
    return st.lists(st.sampled_from(paths).flatmap(lambda p: edit_for(descriptor, p)), min_size=1, max_size=max_edits)


def apply_edits(message: Message, changes: Sequence[tuple[tuple[str, ...], Any]]) -> Message:
    """A copy of ``message`` with ``changes`` applied (values outside a field's type are skipped)."""
    out = type(message)()
    out.CopyFrom(message)
    for path, value in changes:
        parent: Any = out
        for name in path[:-1]:
            parent = getattr(parent, name)
        name = path[-1]
        field = parent.DESCRIPTOR.fields_by_name[name]
        try:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if value == "clear":
                    parent.ClearField(name)
                elif _repeated(field):
                    items = getattr(parent, name)
                    if value == "empty":
                        items.add()
                    else:
                        for existing in list(items)[:4] or [type(items.add())()]:
                            items.add().CopyFrom(existing)
                else:
                    getattr(parent, name).SetInParent()
            elif _repeated(field):
                del getattr(parent, name)[:]
                getattr(parent, name).extend(value[1])
            else:
                setattr(parent, name, value)
        except (ValueError, TypeError):
            continue  # e.g. a float outside float32 for a `float` field: not sendable
    return out


# -- dashboard requests ------------------------------------------------------------------------

DASHBOARD_PATHS = [
    "/", "/index.html", "/runs.html", "/site.html", "/predict.html", "/app.js", "/missing",
    "/api/state", "/api/runs", "/api/runs/1", "/api/runs/run-x/rounds", "/api/runs/run-x/privacy",
    "/api/runs/run-x/model", "/api/sites", "/api/sites/hospital-1",
    "/api/sites/hospital-1/upload", "/api/sites/hospital-1/files/site.csv", "/api/sites/nope/upload",
    "/api/start", "/api/runs/start", "/api/predict", "/api/examples", "/api/clinician/predict",
    "/login", "/logout", "/api/", "//api/state", "/api/state/../runs", "/%2e%2e/%2e%2e/etc/passwd",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
JSON_BODIES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FLOATS.filter(lambda v: v == v), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def dashboard_requests(draw: Any) -> tuple[str, str, bytes, dict[str, str]]:
    method = draw(st.sampled_from(METHODS))
    path = draw(st.one_of(st.sampled_from(DASHBOARD_PATHS),
                          st.sampled_from(DASHBOARD_PATHS).map(lambda p: p + "?" + "filename=../x.csv&x=%00")))
    kind = draw(st.sampled_from(["json", "csv", "raw", "none"]))
    headers: dict[str, str] = {}
    body = b""
    if kind == "json":
        import json

        body = json.dumps(draw(JSON_BODIES), allow_nan=True).encode()
        headers["Content-Type"] = "application/json"
    elif kind == "csv":
        body = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
        headers["Content-Type"] = "text/csv"
    elif kind == "raw":
        body = draw(st.binary(max_size=300))
        headers["Content-Type"] = draw(st.sampled_from(["application/octet-stream", "multipart/form-data", "",
                                                        "application/json; charset=utf-16"]))
    return method, path, body, headers
