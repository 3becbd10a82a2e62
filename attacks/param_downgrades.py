"""Issue 9 attack 1 variants (server-chosen parameters), via the project's TamperingServer plumbing
(the real coordinator + 4 unmodified Federation sites; only the victim's RoundStart is rewritten).

 a) lower the colluding fraction: secagg.max_corrupt_fraction = 0 and t lowered to the c=0 rule
 b) same, but the victim's policy itself says f = 0.2 (server claims 0.2, t for c=0)
 c) complete-graph job, round claims n = 3 (cohort shrunk in the victim's view), t = 2
 d) a cohort slot's credential replaced by a real credential of a site NOT in the job (offline
    member of the consortium; the server has its public credential but not its key)
Result = whether the victim sent any data-bearing message (keys, shares, masked input, unmask).
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.attack_helpers import Consortium
from tests.test_attack_malicious_server import attack, declines, only_first_round_start, sent_data


def variant(name, change, **kw):
    tmp = Path(tempfile.mkdtemp())
    _s, server, _r, errors = attack(tmp, only_first_round_start(change), **kw)
    print(f"{name}: declines={[d[:110] for d in declines(server)][:2]} data sent={sent_data(server)} errors={[str(e)[:80] for e in errors][:2]}")

def a(start):
    start.secagg.max_corrupt_fraction = 0.0
    start.secagg.threshold = 3
def c(start):
    start.secagg.cohort_size = 3
    start.secagg.threshold = 2
    del start.secagg.identity_keys[3:]
    del start.secagg.identity_credentials[3:]
outsider = Consortium.create(["offline-site"])
def d(start):
    slot = (int(start.client_id) + 1) % int(start.secagg.cohort_size)
    # a credential from ANOTHER authority instance with the same consortium name (server-made)
    start.secagg.identity_keys[slot] = outsider.keys["offline-site"].public_key().public_bytes_raw()
    start.secagg.identity_credentials[slot] = outsider.credentials["offline-site"].encode()

if __name__ == "__main__":
    variant("a) f->0, t=3 (n=4)", a)
    variant("b) victim f=0.2, server f=0.2, t=3", a, victim_policy={"max_corrupt_fraction": 0.2})
    variant("c) n->3, t=2", c)
    variant("d) foreign-authority credential in a slot", d)
