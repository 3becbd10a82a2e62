"""Issue 10 attack 1 variants against the real gRPC service (build_server + Coordinator).

One enrolled site with a valid token ("evil") ties up the server without touching the upload path:
  mode=poll   : keeps N concurrent long-poll Poll calls open (max_wait_ms large) in a loop;
  mode=upload : opens N upload streams each with a fresh sequence number, header chunk only.
Three honest scripted sites (the project's Scripted client over GrpcTransport) try to finish a job.
Prints the job outcome, time, and the status codes the evil calls got.
"""
from __future__ import annotations

import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import Authenticator
from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.protocol.service import ServerLimits, build_server
from fedveil.protocol.transport import ClientSession
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.server_helpers import TASK, Scripted, vectors


def main(mode: str, n: int) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    names = ["a", "b", "c", "evil"]
    store = RunStore(tmp / "run.db")
    tokens = {x: store.enroll(x).token for x in names}
    config = ServerConfig(task=TASK, rounds=1, clients_per_round=3, min_clients=3, round_timeout=60.0,
                          stage_timeout=8.0, cohort_wait=2.0, linger=1.0, seed=5, poll_wait=0.5, evaluate=False,
                          final_evaluation=False, active_adversary=False, max_corrupt_fraction=0.0)
    coordinator = Coordinator(config, load_task(TASK), store)
    server, port = build_server(coordinator, Authenticator(store.credential, client_exists=store.client_enrolled),
                                "127.0.0.1:0", credentials=None, limits=ServerLimits())

    def transport(name: str) -> GrpcTransport:
        return GrpcTransport.connect(ChannelConfig(target=f"127.0.0.1:{port}", insecure=True), tokens[name],
                                     rpc_timeout_s=30.0)

    codes: collections.Counter = collections.Counter()
    stop = threading.Event()
    evil = transport("evil")
    joined = evil.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg"))
    sess = ClientSession.from_join(joined)

    def poller() -> None:
        while not stop.is_set():
            try:
                evil.poll(pb.PollRequest(header=sess.header(), max_wait_ms=600_000))
                codes["OK"] += 1
            except Exception as err:
                codes[type(err).__name__ + ":" + str(err)[:60]] += 1
                time.sleep(0.01)

    def uploader() -> None:
        while not stop.is_set():
            h = sess.header()
            def chunks():
                yield pb.MaskedInputChunk(header=h, total_bytes=1 << 20)
                stop.wait(120)
            try:
                evil._upload(chunks(), metadata=evil._metadata, timeout=120)
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[str(err.code())] += 1
                time.sleep(0.05)

    target = poller if mode == "poll" else uploader
    evils = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for th in evils:
        th.start()
    time.sleep(2.0)
    vecs = vectors(3)
    honest = [Scripted(coordinator, x, v, transport=transport(x)) for x, v in zip(names[:3], vecs)]
    threads = [threading.Thread(target=h.run, daemon=True) for h in honest]
    t0 = time.time()
    for th in threads:
        th.start()
    result = []
    job = threading.Thread(target=lambda: result.append(coordinator.run()), daemon=True)
    job.start()
    job.join(150)
    stop.set()
    dt = time.time() - t0
    summary = result[0] if result else None
    print(f"mode={mode} n={n}: job {'status=' + summary.status if summary else 'DID NOT FINISH in 150 s'}"
          f"{'' if not summary else f', completed {summary.completed_rounds} rounds'} in {dt:.1f}s")
    print("honest sites:", [(h.name, h.done, repr(h.error)[:80]) for h in honest])
    print("evil call outcomes:", dict(codes.most_common(6)))
    coordinator.stop()
    server.stop(0).wait(5)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
