"""A malicious server's model size against the unmodified site over gRPC (review finding 7).

``Model.size_bytes`` sized the site's receive buffer before any check
(:meth:`GrpcTransport.fetch_model`): a server announcing 2^40 bytes made the site allocate them on
the first chunk (MemoryError, or the OOM killer near RAM size). Now the size must be the job's
model size announced at Join, and the buffer grows only by the bytes that arrive. The fast tests
script the transport's answers; the slow one runs a real site against a scripted gRPC server.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedveil.clients import Federation
from fedveil.clients.backoff import BackoffPolicy
from fedveil.protocol import SERVICE_NAME
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.client import GrpcTransport
from fedveil.protocol.errors import MalformedMessage
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, job_config

pytestmark = pytest.mark.timeout(240)
DIM = 11
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


JOB_MODEL = [pb.TensorSpec(name="w", shape=[2, 5], dtype="float32"), pb.TensorSpec(name="b", shape=[1])]


def _scripted_transport(size_bytes: int, chunks: list[pb.ModelChunk]) -> tuple[GrpcTransport, list[str]]:
    """A GrpcTransport whose Join, Poll and FetchModel answers are scripted (it never connects)."""
    transport = GrpcTransport(grpc.insecure_channel("127.0.0.1:9"), "token")
    fetched: list[str] = []

    def call(rpc: str, request: Any, timeout: float | None = None) -> Any:
        if rpc == "Join":
            return pb.JoinResponse(job=pb.JobInfo(task_name="t", model=JOB_MODEL))
        model = pb.Model(version=0, sha256=b"\0" * 32, size_bytes=size_bytes)  # data empty, as over gRPC
        return pb.PollResponse(round_start=pb.RoundStart(round=1, model=model))

    def fetch(request: pb.FetchModelRequest, metadata: object, timeout: float) -> Iterator[pb.ModelChunk]:
        fetched.append("called")
        yield from chunks

    transport._call = call  # type: ignore[method-assign]
    transport._fetch = fetch  # type: ignore[assignment]
    return transport, fetched


@pytest.mark.parametrize("size_bytes", [2**62, 2**31, 45, 40])
def test_a_model_size_other_than_the_jobs_is_refused_before_anything_is_fetched(size_bytes: int) -> None:
    transport, fetched = _scripted_transport(size_bytes, [pb.ModelChunk(offset=0, data=b"\0" * 4,
                                                                        total_bytes=size_bytes)])
    transport.join(pb.JoinRequest())
    assert transport.expected_model_bytes == 44  # 11 float32 values, from the job's model spec
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage, match=rf"model\.size_bytes: {size_bytes} bytes, but the job's model "
                                                   r"is 44 bytes"):
            transport.poll(pb.PollRequest(max_wait_ms=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fetched == [] and peak < 1 << 20
    transport.close()


def test_the_jobs_model_size_is_fetched_as_before() -> None:
    data = np.arange(DIM, dtype="<f4").tobytes()
    chunks = [pb.ModelChunk(offset=0, data=data[:8], total_bytes=44), pb.ModelChunk(offset=8, data=data[8:],
                                                                                    total_bytes=44)]
    transport, _fetched = _scripted_transport(44, chunks)
    transport.join(pb.JoinRequest())
    assert transport.poll(pb.PollRequest(max_wait_ms=0)).round_start.model.data == data
    transport.close()


def test_without_a_job_spec_the_buffer_grows_only_by_what_arrives() -> None:
    """A server that announces 2^40 bytes and sends 4 costs the site 4 bytes, not a terabyte."""
    transport, _fetched = _scripted_transport(2**40, [pb.ModelChunk(offset=0, data=b"\0" * 4, total_bytes=2**40)])
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage, match=r"received 4 of 1099511627776 bytes"):
            transport.fetch_model(pb.FetchModelRequest(version=0), 2**40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    transport.close()


@pytest.mark.slow
def test_a_real_site_over_grpc_refuses_a_model_size_the_job_did_not_announce(tmp_path: Path) -> None:
    """The review's repro (fetch_model_size.py): a real Coordinator answers Join, a scripted server
    announces a 2^40-byte model and streams 4 bytes of it. The site used to allocate size_bytes on
    the first chunk (MemoryError, or the OOM killer near RAM size); it now ends with a ClientError
    naming size_bytes, having allocated nothing."""
    consortium = Consortium.create(NAMES)
    coordinator = Coordinator(job_config(), synthetic, RunStore(tmp_path / "run.sqlite"), new_run=True)
    fetches: list[int] = []
    size = 2**40

    def join(request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        return coordinator.join(VICTIM, request)

    def poll(request: pb.PollRequest, context: Any) -> pb.PollResponse:
        model = pb.Model(version=0, sha256=b"\0" * 32, size_bytes=size)
        return pb.PollResponse(round_start=pb.RoundStart(round=1, model=model))

    def fetch(request: pb.FetchModelRequest, context: Any) -> Iterator[pb.ModelChunk]:
        fetches.append(1)
        yield pb.ModelChunk(offset=0, data=b"\0" * 4, total_bytes=size)

    def ser(message: Any) -> bytes:
        return bytes(message.SerializeToString())

    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(join, pb.JoinRequest.FromString, ser),
        "Poll": grpc.unary_unary_rpc_method_handler(poll, pb.PollRequest.FromString, ser),
        "FetchModel": grpc.unary_stream_rpc_method_handler(fetch, pb.FetchModelRequest.FromString, ser),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        options = consortium.options(VICTIM, seed=1, num_examples=10, poll_wait_ms=300,
                                     backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=0.3, give_up_after_s=5.0))
        federation = Federation(GrpcTransport(grpc.insecure_channel(f"127.0.0.1:{port}")), synthetic.name,
                                synthetic.build_model(), options)
        with pytest.raises(Exception, match=r"model\.size_bytes: 1099511627776 bytes, but the job's model is 44 "
                                            r"bytes") as err:
            next(iter(federation))
        assert type(err.value).__name__ == "ClientError"
        assert fetches == []
        federation.close()
    finally:
        server.stop(0)
        coordinator.stop()
