"""The client's reassembly of a fetched model from its stream of chunks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.client import GrpcTransport
from fedveil.protocol.errors import MalformedMessage


def _transport(chunks: list[pb.ModelChunk]) -> GrpcTransport:
    transport = GrpcTransport(grpc.insecure_channel("127.0.0.1:9"), "token")  # never connects

    def fetch(request: pb.FetchModelRequest, metadata: object, timeout: float) -> Iterator[pb.ModelChunk]:
        return iter(chunks)

    transport._fetch = fetch  # type: ignore[assignment]
    return transport


def _split(data: bytes, sizes: list[int]) -> list[pb.ModelChunk]:
    out, offset = [], 0
    for size in sizes:
        out.append(pb.ModelChunk(offset=offset, data=data[offset : offset + size], total_bytes=len(data)))
        offset += size
    return out


@pytest.mark.parametrize("sizes", [[4000], [1000, 1000, 2000], [1, 3999], [4000, 0], [0, 4000]])
def test_the_model_comes_back_whole_however_it_was_chunked(sizes: list[int]) -> None:
    data = os.urandom(4000)
    transport = _transport(_split(data, sizes))
    assert transport.fetch_model(pb.FetchModelRequest(version=3), len(data)) == data
    transport.close()


@pytest.mark.parametrize(("chunks", "error"), [
    (_split(b"x" * 8, [4]), "received 4 of 8 bytes"),
    ([pb.ModelChunk(offset=0, data=b"x" * 8, total_bytes=8), pb.ModelChunk(offset=8, data=b"y", total_bytes=8)],
     "chunk at offset 8 does not fit the 8-byte model"),
    ([pb.ModelChunk(offset=4, data=b"x" * 4, total_bytes=8)], "chunk at offset 4 does not fit"),
    ([pb.ModelChunk(offset=0, data=b"x" * 8, total_bytes=9)], "chunk at offset 0 does not fit the 8-byte model"),
])
def test_a_stream_that_does_not_add_up_to_the_model_is_refused(chunks: list[pb.ModelChunk], error: str) -> None:
    transport = _transport(chunks)
    with pytest.raises(MalformedMessage, match=error):
        transport.fetch_model(pb.FetchModelRequest(version=3), 8)
    transport.close()
