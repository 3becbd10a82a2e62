"""A malicious server lies about the noise the honest sites add, to bend a site's own ledger.

With distributed DP a site records, per release, the noise it can rely on: its own share plus the
announced share of the t − c other honest contributors that any released sum must hold
(:func:`fedveil.clients.admission.admit_round`). Two ways a server could bend that figure:

- claim more contributors (the distributed config's ``n_clients``, the cohort's survivors): the
  site never takes the count from the server — only from the threshold t it enforces itself and
  the colluders c of its own policy;
- show the victim a larger per-site noise share than the other sites (a split view): the
  victim would count the others at the larger share while they add the smaller one. The round's
  DP and encoding sections are bound into the secure-aggregation context
  (:mod:`fedveil.protocol.binding`), so the victim refuses a context that does not bind what it
  was shown, and one that does gives it a session of its own: nothing of its data is combined.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.clients.admission import admit_round
from fedveil.clients.site_state import SiteState
from fedveil.dp.distributed import DistributedDPConfig
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.binding import BINDING_BYTES, bound_context
from fedveil.protocol.codec import model_digest, model_vector
from fedveil.secagg.threshold import cohort_bound
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, TamperingServer, job_config, run_job, turnkey

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
MASKED = ("share_keys", "submit_masked_input", "unmask")


def _distributed_job(**kw: Any) -> Any:
    return job_config(dp="distributed", dp_clip=1.0, dp_noise_multiplier=0.5, dp_bits=24, evaluate=False, **kw)


def _scale_noise(start: pb.RoundStart, factor: float) -> None:
    config = json.loads(start.dp.distributed.config_json)
    config["local_stddev"] = float(config["local_stddev"]) * factor
    start.dp.distributed.config_json = json.dumps(config, sort_keys=True)


def _run(tmp_path: Path, tamper: Any, config: Any) -> tuple[Any, TamperingServer, list[Any], dict[str, Any]]:
    consortium = Consortium.create(NAMES)
    holder: dict[str, Any] = {"consortium": consortium}

    def front(coordinator: Coordinator) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper)
        return holder["s"]

    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES)]
    summary, results, _errors = run_job(tmp_path, config, synthetic, sites, service=front)
    return summary, holder["s"], results, holder


@pytest.mark.slow
@pytest.mark.parametrize("rebind", [False, True])
def test_a_larger_noise_share_shown_to_the_victim_alone_never_enters_its_ledger(tmp_path: Path, rebind: bool) -> None:
    """The server triples the per-site noise share in the victim's RoundStart only (and, with
    ``rebind``, recomputes the context digest over what it showed the victim)."""
    def inflate(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start":
            start = resp.round_start
            _scale_noise(start, 3.0)
            if rebind:
                base = bytes(start.secagg.context)[:-BINDING_BYTES]
                start.secagg.context = bound_context(base, start, model_digest(model_vector(start.model)))
        return resp

    _summary, server, results, _h = _run(tmp_path, inflate, _distributed_job(max_round_attempts=1))
    victim = results[0][0] if results[0] is not None else None
    sent = [name for name, _ in server.sent.calls if name in MASKED]
    assert "submit_masked_input" not in sent, sent  # its input was never combined with the others'
    if victim is not None:
        assert victim.state.releases == [] and victim.state.user_epsilon() == 0.0
    if not rebind:
        declined = [r.decline_reason for r in server.sent.named("respond_to_round") if not r.accept]
        assert declined and "secagg.context" in declined[0]


def test_the_sites_honest_count_is_t_minus_c_whatever_the_server_claims(tmp_path: Path) -> None:
    """The real coordinator's RoundStart, re-announced with a claim of 1000 contributors (bound
    consistently, as a server telling every site the same lie would): the site's event is the same."""
    captured: dict[str, Any] = {}

    def keep(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start" and "start" not in captured:
            captured["start"] = pb.RoundStart.FromString(resp.round_start.SerializeToString())
        return resp

    _summary, server, _results, holder = _run(tmp_path, keep, _distributed_job())
    start: pb.RoundStart = captured["start"]
    join = server.sent.named("join")[0]
    consortium: Consortium = holder["consortium"]
    job = pb.JobInfo(dp_mode="distributed", active_adversary=True,
                     secagg_graph=start.secagg.graph, consortium="attack-tests")
    policy = consortium.policy()

    def admitted(message: pb.RoundStart) -> Any:
        return admit_round(policy, job, message, run_id=start.run_id, own_name=VICTIM,
                           own_key=bytes(join.identity_public_key), now=int(time.time()), state=SiteState.open(None),
                           model_digest=model_digest(model_vector(message.model)))

    honest = admitted(start)
    lie = pb.RoundStart.FromString(start.SerializeToString())
    claimed = DistributedDPConfig(**json.loads(lie.dp.distributed.config_json))
    lie.dp.distributed.config_json = json.dumps(dataclasses.asdict(dataclasses.replace(claimed, n_clients=1000)),
                                                sort_keys=True)
    lie.secagg.context = bound_context(bytes(lie.secagg.context)[:-BINDING_BYTES], lie,
                                       model_digest(model_vector(lie.model)))
    lied = admitted(lie)
    n, k = int(start.secagg.cohort_size), int(start.secagg.degree)
    _h, c = cohort_bound(n, k, policy.max_corrupt_fraction)
    assert honest.honest_contributors == lied.honest_contributors == int(start.secagg.threshold) - c
    assert honest.guaranteed_event is not None and lied.guaranteed_event is not None
    assert honest.guaranteed_event == lied.guaranteed_event  # same curve, same recorded parameters
    assert dict(honest.guaranteed_event.params)["honest_contributors"] == honest.honest_contributors  # type: ignore[union-attr]
