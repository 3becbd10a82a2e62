"""Issue 10.1 / 10.3 rerun over REAL loopback gRPC (build_server + Coordinator, local DP job so
reports carry a LocalPrivacySpend): four cohort members, one evil.

 stall    : the evil member sends the first chunk of its masked input, then stalls 100 s
 report:X : the evil member reports a hostile spend / num_examples (X in inf, tiny, zbig, steps,
            nexamples, nan, negeps) - the status code it gets back is printed; INTERNAL = crash
The job must complete (evil dropped / refused) and no call may end INTERNAL.
"""
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import Authenticator
from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.protocol.service import ServerLimits, build_server
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.server_helpers import TASK, Scripted, vectors

GOOD = dict(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=10, accountant="rdp")
HOSTILE = {
    "inf": dict(GOOD, noise_multiplier=math.inf),
    "nan": dict(GOOD, noise_multiplier=math.nan),
    "tiny": dict(GOOD, noise_multiplier=1e-300),
    "zbig": dict(GOOD, noise_multiplier=1e6, sample_rate=0.5, epsilon=0.0),
    "steps": dict(GOOD, steps=2**64 - 1, accountant="pld"),
    "negeps": dict(GOOD, epsilon=-1.0),
    "nexamples": GOOD,
}


class Proxy:
    def __init__(self, inner: GrpcTransport, case: str, codes: list) -> None:
        self.inner, self.case, self.codes = inner, case, codes

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def report_metrics(self, req: pb.MetricsReport):
        if self.case == "nexamples":
            req.num_examples = 2**64 - 1
        try:
            out = self.inner.report_metrics(req)
            self.codes.append("OK")
            return out
        except Exception as err:
            code = getattr(err, "code", None)
            code = code() if callable(code) else code
            self.codes.append(f"{code or type(err).__name__}: {str(err)[:90]}")
            raise


def main(case: str) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    names = ["a", "b", "c", "evil"]
    store = RunStore(tmp / "run.db")
    tokens = {x: store.enroll(x).token for x in names}
    config = ServerConfig(task=TASK, rounds=2, clients_per_round=4, min_clients=3, round_timeout=30.0,
                          stage_timeout=4.0, cohort_wait=2.0, linger=1.0, seed=5, poll_wait=0.5, evaluate=False,
                          final_evaluation=False, active_adversary=False, dp="local")
    coordinator = Coordinator(config, load_task(TASK), store)
    server, port = build_server(coordinator, Authenticator(store.credential, client_exists=store.client_enrolled),
                                "127.0.0.1:0", credentials=None, limits=ServerLimits())

    def transport(name: str) -> GrpcTransport:
        return GrpcTransport.connect(ChannelConfig(target=f"127.0.0.1:{port}", insecure=True), tokens[name],
                                     rpc_timeout_s=30.0)

    codes: list = []
    vecs = vectors(4)
    spend = pb.LocalPrivacySpend(**GOOD)
    sites = [Scripted(coordinator, x, v, transport=transport(x), privacy=spend) for x, v in zip(names[:3], vecs)]
    if case == "stall":
        evil = Scripted(coordinator, "evil", vecs[3], transport=transport("evil"), stall_upload_s=100.0, privacy=spend)
    else:
        evil = Scripted(coordinator, "evil", vecs[3], transport=Proxy(transport("evil"), case, codes),
                        privacy=pb.LocalPrivacySpend(**HOSTILE[case]))
    sites.append(evil)
    threads = [threading.Thread(target=s.run, daemon=True) for s in sites]
    t0 = time.time()
    for th in threads:
        th.start()
    result = []
    job = threading.Thread(target=lambda: result.append(coordinator.run()), daemon=True)
    job.start()
    job.join(150)
    dt = time.time() - t0
    s = result[0] if result else None
    print(f"{case}: job {s.status + f', {s.completed_rounds} rounds' if s else 'DID NOT FINISH in 150 s'} in {dt:.1f}s;"
          f" honest done={[h.done for h in sites[:3]]}; evil report replies={codes[:3]}; "
          f"evil error={repr(evil.error)[:120] if evil.error else None}")
    for r in store.rounds(coordinator.run_id):
        print(f"   round {r.round} attempt {r.attempt}: {r.status} {(r.reason or '')[:100]}")
    coordinator.stop()
    server.stop(0).wait(5)


if __name__ == "__main__":
    for c in sys.argv[1:]:
        main(c)
