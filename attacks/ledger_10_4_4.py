"""Issue 10.4 rerun: 10 enrolled, 4 online, K = 4 -- the ledger must give the q = 1 epsilon.

Drives the server's own GlobalModel.plan/reserve_budget (what the coordinator calls per round) with
4 sites available at the draw, with and without the amplification claim, and compares the ledger's
epsilon with dp-accounting's RDP epsilon of R plain Gaussian rounds (q = 1) at the same z, delta.
"""
import dp_accounting
import numpy as np

from fedveil.server.config import ServerConfig
from fedveil.server.training import GlobalModel

Z, DELTA, ROUNDS = 1.0, 1e-5, 10


def q1_epsilon() -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(Z), ROUNDS)
    return acc.get_epsilon(DELTA)


for amp in (False, True):
    config = ServerConfig(task="t:t", rounds=ROUNDS, clients_per_round=4, min_clients=2, dp="central",
                          dp_noise_multiplier=Z, dp_delta=DELTA, dp_sampling_amplification=amp)
    model = GlobalModel(config, np.zeros(11, dtype=np.float32), seed=1)
    for r in range(1, ROUNDS + 1):
        plan = model.plan(r, 4, 3, b"ctx")  # 4 sites available at the draw (10 enrolled)
        model.reserve_budget(plan, 4)
    eps = model.ledger.epsilon()
    print(f"amplification={amp}: ledger eps={eps:.4f}; dp-accounting q=1 eps={q1_epsilon():.4f}; "
          f"details={dict(model.ledger.entries[-1].details)}")
