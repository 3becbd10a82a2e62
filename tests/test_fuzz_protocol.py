"""Fuzzing the real gRPC service (issue 10): raw bytes, mutated protobuf requests, and absent or
wrong tokens on every RPC; no call may end in INTERNAL or UNKNOWN, while honest sites finish.

A real job runs on the real coordinator behind ``build_server`` (plaintext, loopback only);
its honest sites talk to the coordinator in-process, the fuzzer over gRPC as an enrolled site.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedveil.protocol.auth import Authenticator
from fedveil.protocol.service import ServerLimits, build_server
from tests.fuzz_inputs import apply_edits, edits
from tests.fuzz_targets import FUZZED_RPCS, UNARY_RPCS, FederationUnderFuzz, grpc_call

BUDGET = 400


def payloads(target: FederationUnderFuzz) -> st.SearchStrategy[tuple[str, bytes, str]]:
    import fedveil.protocol.fedveil_pb2 as pb

    def for_rpc(rpc: str) -> st.SearchStrategy[tuple[str, bytes, str]]:
        cls = UNARY_RPCS[rpc][0] if rpc in UNARY_RPCS else pb.MaskedInputChunk
        mutated = edits(cls.DESCRIPTOR).map(lambda e: apply_edits(target.base_request(rpc), e).SerializeToString())
        raw = st.binary(max_size=200)
        token = st.sampled_from(["mallory", "mallory", "mallory", "none", "wrong"])
        return st.tuples(st.just(rpc), st.one_of(mutated, raw), token)

    return st.sampled_from(FUZZED_RPCS).flatmap(for_rpc)


@pytest.mark.slow
def test_fuzzed_grpc_calls_never_end_in_internal_or_unknown(tmp_path: Path) -> None:
    target = FederationUnderFuzz(tmp_path, honest=5, rounds=2)
    store = target.store
    mallory_token = store.enroll("mallory", rotate=True).token
    server, port = build_server(
        target.coordinator, Authenticator(store.credential, client_exists=store.client_enrolled), "127.0.0.1:0",
        credentials=None, limits=ServerLimits(max_message_bytes=target.coordinator.max_message_bytes(), workers=8,
                                              max_concurrent_rpcs=32),
    )
    tokens = {"mallory": mallory_token, "none": None, "wrong": "x" * 43}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    target.start()

    @settings(max_examples=BUDGET, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payloads(target))
    def fuzz(case: tuple[str, bytes, str]) -> None:
        rpc, payload, who = case
        grpc_call(channel, rpc, payload, tokens[who], target.outcomes)

    try:
        fuzz()
        summary = target.finish()
        exact = target.released_mean_is_exact()
    finally:
        target.finish(timeout=0)
        channel.close()
        server.stop(0).wait(5)
        target.close()
    assert target.outcomes.failures == [], "\n\n".join(target.outcomes.failures)
    assert target.outcomes.total >= BUDGET
    assert summary is not None and summary.status == "completed", summary
    assert target.honest_errors() == {} and exact
    codes = set(target.outcomes.counts)
    assert {"UNAUTHENTICATED", "INVALID_ARGUMENT"} <= codes, codes
