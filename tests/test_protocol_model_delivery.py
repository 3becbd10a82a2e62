"""Which models ride inside the RoundStart and which are fetched in chunks (issue 13)."""

from __future__ import annotations

import hashlib

import numpy as np

from fedveil.protocol.model_delivery import ModelDelivery

TENSORS = [("w", (4,))]


def test_a_model_up_to_the_inline_size_rides_in_the_message_and_a_larger_one_is_fetched() -> None:
    small = np.arange(4, dtype=np.float32)  # 16 bytes
    inline = ModelDelivery.fetched_in_chunks(inline_up_to_bytes=16).publish(1, small, TENSORS)
    assert inline.announced.data == small.tobytes() == inline.data
    assert inline.announced.sha256 == hashlib.sha256(small.tobytes()).digest()
    fetched = ModelDelivery.fetched_in_chunks(inline_up_to_bytes=15).publish(1, small, TENSORS)
    assert fetched.announced.data == b"" and fetched.announced.size_bytes == 16 and fetched.data == small.tobytes()
    default = ModelDelivery.fetched_in_chunks().publish(1, small, TENSORS)  # fedveil server: always fetched
    assert default.announced.data == b""
    assert ModelDelivery.in_messages().publish(1, small, TENSORS).announced.data == small.tobytes()
