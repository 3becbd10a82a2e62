"""A malicious server against the unmodified client code: every attack of issue 9 must fail.

Each test runs a real job (the real coordinator, four real sites in threads) behind a
:class:`~tests.attack_helpers.TamperingServer` that rewrites what the victim (``site-0``) receives.
The assertions are on what the victim *sent*: a site that refuses sends a decline and nothing
about its data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.clients import ClientError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.identity import issue_credential
from fedveil.server.coordinator import SECURE_SUM_ROW, Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import (
    ALL_JOIN_WAIT,
    CONSORTIUM,
    DAY,
    Consortium,
    TamperingServer,
    job_config,
    run_job,
    turnkey,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
DATA_RPCS = ("advertise_keys", "share_keys", "submit_masked_input", "confirm_survivors", "unmask")


def sites(consortium: Consortium, victim_policy: dict[str, Any] | None = None) -> list[Any]:
    out = []
    for i, name in enumerate(NAMES):
        extra = {"policy": consortium.policy(**victim_policy)} if (name == VICTIM and victim_policy) else {}
        out.append(turnkey(synthetic, name, i, consortium, **extra))
    return out


def attack(tmp_path: Path, tamper: Any = None, *, tamper_join: Any = None, config: Any = None,
           victim_policy: dict[str, Any] | None = None, coordinator_cls: type[Coordinator] = Coordinator,
           ) -> tuple[Any, TamperingServer, list[Any], list[BaseException]]:
    consortium = Consortium.create(NAMES)
    holder: dict[str, TamperingServer] = {}

    def front(coordinator: Coordinator) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper, tamper_join)
        return holder["s"]

    summary, results, errors = run_job(tmp_path, config or job_config(), synthetic,
                                       sites(consortium, victim_policy), service=front,
                                       coordinator_cls=coordinator_cls)
    return summary, holder["s"], results, errors


def declines(server: TamperingServer) -> list[str]:
    return [r.decline_reason for r in server.sent.named("respond_to_round") if not r.accept]


def sent_data(server: TamperingServer) -> list[str]:
    return [name for name, _ in server.sent.calls if name in DATA_RPCS]


def only_first_round_start(change: Any) -> Any:
    """Apply ``change`` to the victim's RoundStarts (every attempt)."""
    def tamper(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start":
            change(resp.round_start)
        return resp
    return tamper


# -- 1. every security parameter from the server ---------------------------------------------------

@pytest.mark.slow
def test_a_job_announced_passive_is_refused_at_join_by_a_site_that_does_not_trust_the_server(tmp_path: Path) -> None:
    def downgrade(resp: pb.JoinResponse) -> pb.JoinResponse:
        resp.job.active_adversary = False
        return resp

    # the refused victim never answers a round it is drawn into: the commit stage waits out its timeout
    # for it (1.5 s instead of the helpers' 5; only the victim's calls and errors are checked)
    _summary, server, _results, errors = attack(tmp_path, tamper_join=downgrade,
                                                config=job_config(min_clients=3, clients_per_round=3,
                                                                  stage_timeout=1.5))
    assert any(isinstance(e, ClientError) and "passive" in str(e) for e in errors), errors
    assert sent_data(server) == [] and server.sent.named("respond_to_round") == []


@pytest.mark.slow
def test_a_round_announced_passive_inside_an_active_job_is_declined(tmp_path: Path) -> None:
    def passive(start: pb.RoundStart) -> None:
        start.secagg.active_adversary = False
        del start.secagg.identity_credentials[:]

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(passive))
    assert declines(server) and "adversary mode" in declines(server)[0]
    assert sent_data(server) == []


def test_a_sparse_graph_in_a_job_announced_on_the_complete_graph_is_declined(tmp_path: Path) -> None:
    # the reverse (a Harary job falling back to the complete graph) is allowed: it is never weaker
    def sparsify(start: pb.RoundStart) -> None:
        start.secagg.graph = "harary"
        start.secagg.degree = 2

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(sparsify))
    assert declines(server) and "graph" in declines(server)[0]
    assert sent_data(server) == []


def test_an_invented_cohort_signed_by_the_servers_own_authority_is_declined(tmp_path: Path) -> None:
    rogue = Ed25519PrivateKey.generate()  # the server made its own "authority"
    now = int(time.time())

    def invent(start: pb.RoundStart) -> None:
        for slot in range(int(start.secagg.cohort_size)):
            if slot == int(start.client_id):
                continue
            key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
            cred = issue_credential(rogue, CONSORTIUM, f"ghost-{slot}", key, not_before=now - DAY, not_after=now + DAY)
            start.secagg.identity_keys[slot] = key
            start.secagg.identity_credentials[slot] = cred.encode()

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(invent))
    assert declines(server) and "not vouched" in declines(server)[0] and "signature" in declines(server)[0]
    assert sent_data(server) == []


def test_a_real_credential_with_a_key_the_server_swapped_in_is_declined(tmp_path: Path) -> None:
    def swap(start: pb.RoundStart) -> None:
        slot = (int(start.client_id) + 1) % int(start.secagg.cohort_size)
        start.secagg.identity_keys[slot] = Ed25519PrivateKey.generate().public_key().public_bytes_raw()

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(swap))
    assert declines(server) and "credential" in declines(server)[0]
    assert sent_data(server) == []


def test_one_site_in_two_cohort_slots_is_declined(tmp_path: Path) -> None:
    def duplicate(start: pb.RoundStart) -> None:
        a, b = [s for s in range(int(start.secagg.cohort_size)) if s != int(start.client_id)][:2]
        start.secagg.identity_keys[b] = start.secagg.identity_keys[a]
        start.secagg.identity_credentials[b] = start.secagg.identity_credentials[a]

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(duplicate))
    assert declines(server)
    assert "already holds slot" in declines(server)[0]
    assert sent_data(server) == []


def test_a_threshold_below_the_collusion_rule_is_declined(tmp_path: Path) -> None:
    def lower(start: pb.RoundStart) -> None:
        start.secagg.threshold = 2

    _s, server, _r, _e = attack(tmp_path, only_first_round_start(lower))
    assert declines(server) and "2t > h + c" in declines(server)[0]
    assert sent_data(server) == []


def test_a_cohort_below_the_sites_minimum_is_declined(tmp_path: Path) -> None:
    _s, server, _r, _e = attack(tmp_path, victim_policy={"min_cohort": 5})
    assert declines(server) and "minimum" in declines(server)[0]
    assert sent_data(server) == []


# -- grinding the Harary layout: the commit-then-reveal seed --------------------------------------

@pytest.mark.slow
def test_a_commitment_list_without_the_victims_own_commitment_gets_no_reveal(tmp_path: Path) -> None:
    def alter(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "commitments":
            for c in resp.commitments.commitments:
                c.commitment = bytes(32) if c.client_id == 0 else c.commitment
        return resp

    # min_clients 3: once the victim has withheld (it is left out of the round's later attempts) the job goes on
    summary, server, _r, _e = attack(tmp_path, alter, config=job_config(min_clients=3, cohort_wait=ALL_JOIN_WAIT))
    assert summary.status == "completed"
    assert server.sent.named("reveal_contribution") == []
    assert sent_data(server) == []


def test_a_withheld_reveal_stops_the_victim_before_it_sends_keys(tmp_path: Path) -> None:
    def drop(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "contributions":
            del resp.contributions.reveals[-1]
        return resp

    _s, server, _r, _e = attack(tmp_path, drop)
    assert server.sent.named("reveal_contribution")  # it revealed its own value
    assert sent_data(server) == []  # but never used a seed the server could have chosen


def test_a_commitment_list_naming_a_member_twice_gets_no_reveal(tmp_path: Path) -> None:
    """Two commitments for one member would let the server open whichever suits it."""
    def twice(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "commitments":
            extra = resp.commitments.commitments.add()
            extra.client_id = resp.commitments.commitments[1].client_id
            extra.commitment = bytes(32)
        return resp

    _s, server, _r, _e = attack(tmp_path, twice)
    assert server.sent.named("reveal_contribution") == []
    assert sent_data(server) == []


def test_a_reveal_that_does_not_open_its_commitment_stops_the_victim_before_it_sends_keys(tmp_path: Path) -> None:
    """The server swaps one member's revealed value after seeing the others (a seed of its choice)."""
    def swap(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "contributions":
            resp.contributions.reveals[-1].contribution = bytes(32)
        return resp

    _s, server, _r, _e = attack(tmp_path, swap)
    assert server.sent.named("reveal_contribution")
    assert sent_data(server) == []


@pytest.mark.slow
def test_keys_from_a_client_that_never_committed_are_refused(tmp_path: Path) -> None:
    """The server shows the victim a commitment list without one member (its view of U0), then
    forwards that member's keys anyway: the layout would then not be the one the seed fixed."""
    def hide_member(resp: pb.PollResponse) -> pb.PollResponse:
        kind = resp.WhichOneof("instruction")
        if kind == "commitments":
            kept = [c for c in resp.commitments.commitments if c.client_id != 3]
            del resp.commitments.commitments[:]
            resp.commitments.commitments.extend(kept)
        elif kind == "contributions":
            kept_r = [r for r in resp.contributions.reveals if r.client_id != 3]
            del resp.contributions.reveals[:]
            resp.contributions.reveals.extend(kept_r)
        return resp

    _s, server, _r, _e = attack(tmp_path, hide_member)
    assert server.sent.named("share_keys") == []
    assert server.sent.named("submit_masked_input") == []


# -- 3. no differencing across attempts -------------------------------------------------------------

class FakeAbortAfterUnmasking(Coordinator):
    """Unmasks round 1 (so it holds the sum), tells every site the attempt aborted, and retries."""

    faked = 0

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        if self.faked:
            return super()._run_round(number, available, purpose)
        type(self).faked += 1
        original = self.model.apply

        def steal(plan: Any, ring_sum: Any, survivors: int) -> Any:
            self.stolen = ring_sum.copy()  # the server holds attempt 1's sum ...
            raise RuntimeError("fake abort after unmasking")  # ... and claims the attempt failed

        self.model.apply = steal  # type: ignore[method-assign]
        try:
            return super()._run_round(number, available, purpose)
        except RuntimeError:
            with self._cond:
                rnd = self._round
                assert rnd is not None
                self._abort_attempt_after_release(rnd)
            return "aborted"
        finally:
            self.model.apply = original  # type: ignore[method-assign]

    def _abort_attempt_after_release(self, rnd: Any) -> None:
        self.store.abort_round(self.run_id, rnd.number, rnd.attempt, "faked", None)
        self._aborted_attempts += 1
        self._finish_round_for_clients(rnd, pb.ROUND_OUTCOME_ABORTED, "faked abort", ())


def test_sites_that_released_unmasking_shares_decline_every_retry_of_that_round(tmp_path: Path) -> None:
    FakeAbortAfterUnmasking.faked = 0
    summary, server, results, _errors = attack(
        tmp_path, config=job_config(max_round_attempts=3, stage_timeout=3.0), coordinator_cls=FakeAbortAfterUnmasking)
    assert summary.status == "failed" and summary.completed_rounds == 0
    assert len(server.sent.named("submit_masked_input")) == 1  # never a second masked input for round 1
    assert declines(server) and "already released" in declines(server)[0]
    for fed, history in (r for r in results if r is not None):
        assert [h.outcome for h in history].count("declined") >= 1
        assert fed.state.last_released_round(fed.run_id) == 1


# -- 4. evaluation is not an oracle on raw data -------------------------------------------------------

def test_per_site_metrics_never_leave_a_site_whose_policy_keeps_evaluation_secure(tmp_path: Path) -> None:
    _s, server, _r, errors = attack(tmp_path, config=job_config(evaluation="clear", final_evaluation=True))
    assert errors == []
    reports = server.sent.named("report_metrics")
    assert reports and all(len(r.metrics) == 0 for r in reports)


def test_secure_evaluation_stores_only_the_cohort_sum_and_it_is_the_weighted_mean(tmp_path: Path) -> None:
    consortium = Consortium.create(NAMES)
    captured: dict[str, Any] = {}

    class Keep(Coordinator):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            captured["c"] = self

    summary, _results, errors = run_job(tmp_path, job_config(rounds=1), synthetic, sites(consortium),
                                        coordinator_cls=Keep)
    assert errors == [] and summary.status == "completed"
    coordinator = captured["c"]
    store = type(coordinator.store)(tmp_path / "run.sqlite")
    rows = store.evaluations(summary.run_id, 0)
    assert [name for name, _n, _m in rows] == [SECURE_SUM_ROW]  # no site's own row, ever
    torch.manual_seed(coordinator.seed)
    model = synthetic.build_model()
    expected: dict[str, float] = {}
    weights = 0.0
    for i in range(4):
        assert synthetic.synthetic_data is not None
        data = synthetic.synthetic_data(i, 4, 3)
        m = synthetic.evaluate(model, data)
        weights += len(data)
        for k in ("loss", "accuracy"):
            expected[k] = expected.get(k, 0.0) + len(data) * m[k]
    got = rows[0][2]
    for k in ("loss", "accuracy"):
        assert got[k] == pytest.approx(expected[k] / weights, rel=1e-4)
    store.close()
