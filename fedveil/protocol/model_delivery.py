"""How the global model reaches the sites: inside each message, or fetched in chunks.

A round's ``RoundStart`` (and an ``Evaluate``) names the model the sites train or evaluate: its
version, tensor layout, SHA-256 and size. In process the message carries the bytes too. Over gRPC it
does not: every site fetches the bytes with ``FetchModel`` in chunks, so a round of n sites holds one
serialized copy of the model, not n (the servicer slices its chunks once per model). Either way the
serialization is done once per model version here, in the transport layer, and every site of a round
receives the same objects. The coordinator only says which version is current.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_digest, model_message


@dataclass(frozen=True)
class PublishedModel:
    """One model version as the sites receive it."""

    version: int
    announced: pb.Model
    """What ``RoundStart.model`` / ``Evaluate.model`` carry (with ``data`` only when delivered inline)."""
    data: bytes
    """The model's bytes (float32, little-endian), as ``FetchModel`` serves them."""
    digest: bytes
    """:func:`fedveil.protocol.codec.model_digest` of those values: the name each site computes for
    the model it loads, which the round's secure-aggregation context binds."""


class ModelDelivery:
    """Publishes each model version once; ``inline`` puts the bytes into the messages themselves, and
    so does ``inline_up_to_bytes`` for a model no larger than that."""

    def __init__(self, *, inline: bool, inline_up_to_bytes: int = 0) -> None:
        self.inline = inline
        self.inline_up_to_bytes = inline_up_to_bytes
        self._lock = threading.Lock()
        self._current: PublishedModel | None = None

    @classmethod
    def in_messages(cls) -> ModelDelivery:
        return cls(inline=True)

    @classmethod
    def fetched_in_chunks(cls, *, inline_up_to_bytes: int = 0) -> ModelDelivery:
        """Over gRPC. ``inline_up_to_bytes``: a model this small rides in the messages instead. A
        simulation worker's thousands of sites each waiting on a ``FetchModel`` stream woke 10 times
        a second apiece (gRPC's stream reads poll for signals), for a 4 KB model."""
        return cls(inline=False, inline_up_to_bytes=inline_up_to_bytes)

    def publish(self, version: int, vector: np.ndarray, tensors: Sequence[tuple[str, Sequence[int]]]) -> PublishedModel:
        """The publication of ``version`` (built on its first request; ``vector`` is its flat weights)."""
        with self._lock:
            if self._current is None or self._current.version != version:
                full = model_message(vector, version, tensors)
                inline = self.inline or full.size_bytes <= self.inline_up_to_bytes
                announced = full if inline else pb.Model(
                    version=full.version, tensors=full.tensors, sha256=full.sha256, size_bytes=full.size_bytes)
                self._current = PublishedModel(version, announced, full.data,
                                               model_digest(np.frombuffer(full.data, dtype="<f4")))
            return self._current
