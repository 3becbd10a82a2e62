"""Issue 9.2: does a default-policy site (f = 1/3) admit the round parameters the split-view leak
needs (harary_split_real.py)?  Calls the site's own check_threshold on a RoundStart carrying them."""
from fedveil.clients.admission import check_threshold
from fedveil.clients.policy import SitePolicy
from fedveil.errors import FedveilError
from fedveil.protocol import fedveil_pb2 as pb

policy = SitePolicy(authority_public_key=b"\0" * 32, consortium="c")  # defaults otherwise
for n, k, t in ((20, 10, 9), (20, 12, 10), (20, 8, 8), (24, 12, 11), (30, 14, 13)):
    start = pb.RoundStart()
    start.secagg.cohort_size, start.secagg.graph, start.secagg.degree = n, "harary", k
    start.secagg.threshold, start.secagg.max_corrupt_fraction = t, 1 / 3
    try:
        h, c = check_threshold(policy, start)
        print(f"n={n} k={k} t={t}: ADMITTED by the default policy (h={h}, c={c})")
    except FedveilError as err:
        print(f"n={n} k={k} t={t}: refused: {err}")
