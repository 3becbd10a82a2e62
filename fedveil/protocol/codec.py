"""Vectors on the wire: raw little-endian elements in ``bytes`` fields, decoded without copies.

Models travel as float32 (``Model.data``), masked inputs as ring elements of Z_2^k: uint32 when
k <= 32, uint64 otherwise. Decoding checks the exact byte length and raises
:class:`~fedveil.protocol.errors.MalformedMessage` naming the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage


def ring_dtype(ring_bits: int) -> np.dtype:
    """Little-endian unsigned dtype holding elements of Z_2^ring_bits."""
    if not 1 <= ring_bits <= 64:
        raise ValueError(f"ring_bits must be in [1, 64] (got {ring_bits})")
    return np.dtype("<u4") if ring_bits <= 32 else np.dtype("<u8")


def encode_ring_vector(vector: np.ndarray, ring_bits: int) -> bytes:
    dtype = ring_dtype(ring_bits)
    arr = np.asarray(vector)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D ring vector (got shape {arr.shape})")
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr.tobytes()


def decode_ring_vector(
    data: bytes | bytearray | memoryview, dimension: int, ring_bits: int, field: str = "masked_vector"
) -> np.ndarray:
    """A read-only view of ``dimension`` ring elements; the element values are reduced mod 2^k."""
    dtype = ring_dtype(ring_bits)
    expected = dimension * dtype.itemsize
    if len(data) != expected:
        raise MalformedMessage(
            f"{field}: expected {dimension} ring elements of {dtype.itemsize} bytes ({expected} bytes), "
            f"got {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype)
    if ring_bits not in (32, 64) and arr.size and int(arr.max()) >> ring_bits:
        raise MalformedMessage(f"{field}: an element is not below 2^{ring_bits}")
    return arr


def model_message(vector: np.ndarray, version: int, tensors: Sequence[tuple[str, Sequence[int]]] = ()) -> pb.Model:
    """A :class:`pb.Model` from a flat float vector (``fedveil.task.model_to_vector`` order)."""
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return pb.Model(
        version=version,
        tensors=[pb.TensorSpec(name=name, shape=list(shape)) for name, shape in tensors],
        data=data,
        sha256=hashlib.sha256(data).digest(),
        size_bytes=len(data),
    )


def model_digest(vector: np.ndarray) -> bytes:
    """A site's own name for a global model: SHA-256 of its float32 values, with -0.0 read as 0.0.

    Computed from the values the site will load, never taken from the server's ``sha256`` field: a
    server that replays a model must not get it past the site's replay check (its list of models
    it released a sum over) by sending that field empty, or by re-encoding the same model (a zero
    as -0.0). ``vector`` is finite (:func:`model_vector` refuses NaN and infinities)."""
    canonical = np.add(np.asarray(vector, dtype="<f4"), np.float32(0.0), dtype="<f4")  # -0.0 + 0.0 = 0.0
    return hashlib.sha256(canonical.tobytes()).digest()


def model_vector(model: pb.Model, expected_size: int | None = None) -> np.ndarray:
    """The flat float32 vector of a :class:`pb.Model`, checked against its digest and layout."""
    data = model.data
    if len(data) % 4:
        raise MalformedMessage(f"model.data: {len(data)} bytes is not a whole number of float32 values")
    if model.sha256 and hashlib.sha256(data).digest() != model.sha256:
        raise MalformedMessage("model.sha256: does not match model.data")
    size = len(data) // 4
    if model.tensors:
        declared = sum(int(np.prod(t.shape, dtype=np.int64)) for t in model.tensors)
        if declared != size:
            raise MalformedMessage(f"model.tensors: declare {declared} values, model.data holds {size}")
    if expected_size is not None and size != expected_size:
        raise MalformedMessage(f"model.data: expected {expected_size} float32 values, got {size}")
    vec = np.frombuffer(data, dtype="<f4")
    if not np.all(np.isfinite(vec)):
        raise MalformedMessage("model.data: contains NaN or infinite values")
    return vec
