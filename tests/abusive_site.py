"""An abusive site, run as its own OS process against a real ``fedveil server`` (issue 10's
real-process test). Two kinds:

- ``flood``: the real ``fedveil client`` (its code unmodified) whose gRPC transport, when the
  site uploads its masked input, first opens ``FLOOD_STREAMS`` extra upload streams that replay
  the same header and data, and afterwards re-sends the same request (a replayed header).
  It stays a cohort member otherwise, so rounds keep their survivors.
- ``reports``: never polls (so it is never drawn into a cohort); it joins with its real identity
  and sends out-of-range reports, oversized and made-up uploads, again and again.

Every refusal it gets is printed as one JSON line on stdout (``{"refused": CODE, ...}``), so
the test can count them; it never sees INTERNAL unless the server has a bug.

    python -m tests.abusive_site flood -- <fedveil client arguments>
    python -m tests.abusive_site poison weight|unclipped -- <fedveil client arguments>
    python -m tests.abusive_site reports --server ADDR --token T --identity-key K --credential C --rounds N
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

FLOOD_STREAMS = 12


def note(kind: str, **fields: Any) -> None:
    print(json.dumps({kind: True, **fields}, sort_keys=True, default=str), flush=True)


def _status(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else "UNKNOWN"


def flood() -> int:
    from fedveil.cli import main
    from fedveil.protocol import fedveil_pb2 as pb
    from fedveil.protocol.client import GrpcTransport
    from fedveil.protocol.errors import ProtocolError

    genuine = GrpcTransport.submit_masked_input

    def one_stream(transport: GrpcTransport, request: Any) -> None:
        chunk = pb.MaskedInputChunk(header=request.header, total_bytes=len(request.masked_vector),
                                    data=request.masked_vector)
        try:
            transport._upload(iter([chunk]), metadata=transport._metadata, timeout=30)
            note("accepted", rpc="UploadMaskedInput(replay)")
        except grpc.RpcError as err:
            note("refused", rpc="UploadMaskedInput(replay)", code=_status(err))

    def flooding_submit(self: GrpcTransport, request: Any) -> Any:
        streams = [threading.Thread(target=one_stream, args=(self, request)) for _ in range(FLOOD_STREAMS)]
        for stream in streams:
            stream.start()
        try:
            ack = genuine(self, request)
            note("accepted", rpc="SubmitMaskedInput")
        except ProtocolError as err:
            note("refused", rpc="SubmitMaskedInput", code=err.code.name)
            ack = pb.Ack()
        for stream in streams:
            stream.join(40)
        try:  # the same header once more: a replay
            genuine(self, request)
            note("accepted", rpc="SubmitMaskedInput(replay)")
        except ProtocolError as err:
            note("refused", rpc="SubmitMaskedInput(replay)", code=err.code.name)
        return ack

    GrpcTransport.submit_masked_input = flooding_submit  # type: ignore[method-assign]
    args = sys.argv[sys.argv.index("--") + 1:]
    return int(main(["client", *args]) or 0)


BAD_SPENDS: list[dict[str, Any]] = [
    {"noise_multiplier": float("inf")}, {"noise_multiplier": 1e-300}, {"noise_multiplier": float("nan")},
    {"steps": 10**8, "accountant": "pld"}, {"epsilon": -1.0}, {"epsilon": float("nan")}, {"sample_rate": 7.0},
    {"delta": 2.0}, {"accountant": "x" * 5000},
]


def reports(args: argparse.Namespace) -> int:
    from fedveil.clients.api import load_identity_key
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol import fedveil_pb2 as pb
    from fedveil.protocol.client import ChannelConfig, GrpcTransport
    from fedveil.protocol.errors import ProtocolError
    from fedveil.protocol.identity_files import load_credential
    from fedveil.protocol.transport import ClientSession

    transport = GrpcTransport.connect(ChannelConfig(target=args.server, insecure=True), args.token, rpc_timeout_s=20)
    key = load_identity_key(Path(args.identity_key))
    joined = transport.join(pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg", num_examples=10,
        identity_public_key=key.public_key().public_bytes_raw(),
        identity_credential=load_credential(Path(args.credential)).encode()))
    session = ClientSession.from_join(joined)
    note("joined", run=joined.run_id)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for spend in BAD_SPENDS:
            for number in range(0, args.rounds + 2):
                privacy = pb.LocalPrivacySpend(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1,
                                               steps=10, accountant="rdp")
                for name, value in spend.items():
                    setattr(privacy, name, value)
                request = pb.MetricsReport(header=session.header(number), model_version=number,
                                           num_examples=2**64 - 1, privacy=privacy,
                                           metrics=[pb.Metric(name="loss", value=float("inf"))])
                try:
                    transport.report_metrics(request)
                    note("accepted", rpc="ReportMetrics")
                except ProtocolError as err:
                    note("refused", rpc="ReportMetrics", code=err.code.name)
        for total in (0, 48, 2**40):
            chunk = pb.MaskedInputChunk(header=session.header(1, b"\x00" * 16), total_bytes=total, data=b"\x01" * 48)
            try:
                transport._upload(iter([chunk, chunk]), metadata=transport._metadata, timeout=10)
                note("accepted", rpc="UploadMaskedInput")
            except grpc.RpcError as err:
                note("refused", rpc="UploadMaskedInput", code=_status(err))
        time.sleep(0.2)
    transport.close()
    return 0


def poison(kind: str) -> int:
    """``weight``: claim a weight of 1e9 in every RoundResponse. ``unclipped``: skip the user-level
    clip and send the update inflated 1000-fold (the encoder still bounds each coordinate)."""
    import numpy as np

    from fedveil.cli import main
    from fedveil.dp.clipping import ClipResult
    from fedveil.protocol.client import GrpcTransport

    if kind == "weight":
        genuine = GrpcTransport.respond_to_round

        def inflated(self: GrpcTransport, request: Any) -> Any:
            request.weight = 1e9
            return genuine(self, request)

        GrpcTransport.respond_to_round = inflated  # type: ignore[method-assign]
    else:
        import fedveil.clients.update as update

        def no_clip(delta: Any, clip_norm: float) -> ClipResult:
            values = np.asarray(delta, dtype=np.float64).reshape(-1) * 1000.0
            return ClipResult(clipped=values, norm=float(np.linalg.norm(values)), unclipped=1.0)

        update.clip_update = no_clip  # type: ignore[assignment]
    args = sys.argv[sys.argv.index("--") + 1:]
    return int(main(["client", *args]) or 0)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "flood":
        return flood()
    if len(sys.argv) > 2 and sys.argv[1] == "poison":
        return poison(sys.argv[2])
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["reports"])
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--identity-key", required=True)
    parser.add_argument("--credential", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    return reports(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
