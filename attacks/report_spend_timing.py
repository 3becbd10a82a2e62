"""Time the server's own report path (check_report + verify_spend) and a fresh RDP epsilon for hostile z."""
import time

import fedveil.dp.accounting as A
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.reports import SpendContext, check_report, verify_spend

for z, q, s in [(1.0, 0.5, 1), (1e6, 0.5, 1), (1e6, 1.0, 10**9), (1e-6, 1.0, 10**9), (99.0, 0.5, 1)]:
    req = pb.MetricsReport(num_examples=100)
    req.privacy.CopyFrom(pb.LocalPrivacySpend(epsilon=1.0, delta=1e-5, noise_multiplier=z, sample_rate=q, steps=s, accountant="rdp"))
    t0 = time.time(); rep = check_report(req)
    v = verify_spend(rep.privacy, rep.num_examples, [], SpendContext(delta=1e-5, noise_multiplier=None, local_epochs=1))
    t1 = time.time()
    acc = A.make_accountant("rdp"); acc.compose(rep.privacy.event()); e = acc.get_epsilon(1e-5); t2 = time.time()
    print(f"z={z:g} q={q} steps={s}: verify_spend {t1-t0:.2f}s (recomputed {v.epsilon_recomputed}, verified {v.verified}); fresh RDP eps {e:.3g} in {t2-t1:.2f}s", flush=True)
