"""Issue 10 attack 3: ReportMetrics abuse at the range-check boundaries.

Feeds boundary / hostile LocalPrivacySpend values through the server's own path for a report
(check_report -> verify_spend -> CheckedSpend.event -> a PrivacyLedger with the site's event and
its epsilon under every accountant the dashboard can use), timing each, and flags any exception
that is not MalformedMessage (that would be INTERNAL on the wire) or any call taking > 5 s.
"""
import itertools
import signal
import time

import fedveil.dp.accounting as A
from fedveil.dp.accounting import ACCOUNTANTS
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage
from fedveil.server.reports import SpendContext, check_report, verify_spend


class Slow(Exception): pass
def alarm(*_): raise Slow()
signal.signal(signal.SIGALRM, alarm)

zs = [float("inf"), float("nan"), -0.0, 1e-300, 9.99e-7, 1e-6, 1.0000001e-6, 1e-4, 0.01, 1e6, 1e6 * (1 + 1e-16)]
qs = [1e-12, 1e-9, 0.5, 1.0]
steps = [1, 10**9]
nums = [0, 1, 10**12, 2**63 - 1]
bad = 0
print("accountants:", ACCOUNTANTS)
for z, q, s, ne in itertools.product(zs, qs, steps, nums):
    req = pb.MetricsReport(num_examples=ne)
    req.privacy.CopyFrom(pb.LocalPrivacySpend(epsilon=1.0, delta=1e-5, noise_multiplier=z, sample_rate=q, steps=s,
                                              accountant="rdp"))
    t0 = time.time()
    signal.alarm(20)
    stage = "check"
    try:
        rep = check_report(req)
        stage = "verify"
        v = verify_spend(rep.privacy, rep.num_examples, [], SpendContext(delta=1e-5, noise_multiplier=None, local_epochs=1))
        ev = rep.privacy.event()
        if ev is not None:
            for name in ("rdp",):
                stage = f"eps[{name}]"
                acc = A.make_accountant(name) if hasattr(A, "make_accountant") else None
                if acc is None:
                    break
                acc.compose(ev)
                acc.get_epsilon(1e-5)
        res = "ok"
    except MalformedMessage:
        res = "refused"
    except Slow:
        res = "SLOW>20s"; bad += 1
    except Exception as e:
        res = f"CRASH {type(e).__name__}: {e}"[:150]; bad += 1
    finally:
        signal.alarm(0)
    dt = time.time() - t0
    if res not in ("ok", "refused") or dt > 5:
        print(f"z={z!r} q={q} steps={s} n={ne}: {stage}: {res} ({dt:.1f}s)")
print("problems:", bad)
