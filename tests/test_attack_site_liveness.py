"""One malicious site against the job's liveness, with the real coordinator and real honest sites.

The third attacker review: a site that sent share boxes of the right size filled with random
bytes made every honest holder leave the masked-input stage, so each attempt aborted, the site
was never blamed and was drawn again, and the job failed after ``--max-round-attempts``. Now each
holder sends a verifiable complaint (:mod:`fedveil.secagg.share_complaints`), the server convicts
the sender, and the job completes without it. The same judgement convicts a site that complains
falsely about an honest neighbour.

A wrong unmasking share in a cohort too small to correct it (⌊(N − t)/2⌋ = 0) made the attempt
abort *after* the honest sites released their shares; they refuse a retry of such a round, so the
job failed. Then the round was rejected (skipped, counted) and the job went on, but nobody could
say whether the holder or the share's owner had lied. Now every share opens its owner's commitment
(:mod:`fedveil.secagg.share_commitments`): a holder that returns another is convicted, and so is an
owner whose committed shares do not reconstruct.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedveil.clients.policy import SitePolicy
from fedveil.commands.server import _print_summary
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg import client as secagg_client
from fedveil.secagg.shamir import PRIME
from fedveil.server.coordinator import Coordinator
from fedveil.server.events import RoundCompleted
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, RESPONSIVE_DEADLINES, Consortium, job_config, run_job, turnkey
from tests.server_helpers import coordinator_watchdog

pytestmark = pytest.mark.timeout(180)
NAMES = ["site-0", "site-1", "site-2", "evil"]


class GarbageBoxes(InProcessTransport):
    """Seals random bytes of the right size in every share box (the signature bytes too, in active mode)."""

    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack:
        for share in request.shares:
            share.ciphertext = os.urandom(len(share.ciphertext))
        return super().share_keys(request)


class FalseComplaint(InProcessTransport):
    """Opens its boxes fine, then, instead of its masked input, accuses an honest neighbour with a
    made-up pair point and proof."""

    accused: str = "site-0"

    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack:
        coordinator = self._service
        assert isinstance(coordinator, Coordinator) and coordinator._round is not None
        victim = coordinator._round.cohort[self.accused]
        complaint = pb.ShareComplaint(sender_id=victim, kind=pb.SHARE_COMPLAINT_KIND_UNDECRYPTABLE,
                                      shared_point=os.urandom(32), proof=os.urandom(96))
        return self.complain_about_shares(pb.ShareComplaintsRequest(header=request.header, complaints=[complaint]))


class WrongUnmaskingShare(InProcessTransport):
    """Adds one to the first limb of the last share it reveals (an honest neighbour's)."""

    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack:
        if request.shares:
            share = request.shares[-1]
            limbs = np.frombuffer(share.share, dtype="<u4").copy()
            limbs[0] = (int(limbs[0]) + 1) % ((1 << 31) - 1)
            share.share = limbs.tobytes()
        return super().unmask(request)


class EvilDealer(InProcessTransport):
    """A site whose client deals inconsistent shares (``DEALER.evil`` is set in its own thread)."""

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        DEALER.evil = True
        return super().join(request)


@dataclass
class StopAfterRound:
    coordinator: Coordinator
    round: int

    def on_event(self, event: object) -> None:
        if isinstance(event, RoundCompleted) and event.round == self.round:
            self.coordinator.stop()


def _run(tmp_path: Path, evil_transport: type[InProcessTransport], *, active: bool, stop_after_round: int = 0,
         new_run: bool = True, names: list[str] = NAMES, on_coordinator: Callable[[Coordinator], None] | None = None,
         **config: Any) -> tuple[Any, list[BaseException], Coordinator]:
    consortium = Consortium.create(names)
    options: dict[str, Any] = {} if active else {"policy": SitePolicy(trust_server=True)}
    if stop_after_round:  # the stopped server's sites give up on it after 3 s of refused calls, not 20 s
        options["give_up_after_s"] = 3.0
    cfg: dict[str, Any] = dict(rounds=2, clients_per_round=4, min_clients=3, max_round_attempts=2,
                               active_adversary=active, cohort_wait=ALL_JOIN_WAIT, **RESPONSIVE_DEADLINES)
    cfg.update(config)
    seen: list[Coordinator] = []

    def front(coordinator: Coordinator) -> Coordinator:
        seen.append(coordinator)
        if on_coordinator is not None:
            on_coordinator(coordinator)
        if stop_after_round:  # the in-process stand-in for a server killed after that round
            coordinator.listeners.add(StopAfterRound(coordinator, stop_after_round))
        return coordinator

    sites = [turnkey(synthetic, name, i, consortium, len(names),
                     transport=evil_transport if name == "evil" else InProcessTransport, **options)
             for i, name in enumerate(names)]
    summary, _results, errors = run_job(tmp_path, job_config(**cfg), synthetic, sites, service=front, new_run=new_run,
                                        enrolled=names)
    return summary, errors, seen[0]


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
def test_garbage_share_boxes_convict_the_sender_and_the_job_completes_without_it(tmp_path: Path,
                                                                                 active: bool) -> None:
    """Before: 'failed | completed 0/2 | round 1 aborted 3 times'. Passive mode proves the failure
    with the pair's point and a DLEQ proof; active mode by the sender's own (bad) box signature."""
    summary, _errors, coordinator = _run(tmp_path, GarbageBoxes, active=active)
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message
    assert set(coordinator._convicted) == {"evil"}
    assert "share box" in coordinator._convicted["evil"]
    assert summary.aborted_attempts == 1  # the attempt that exposed it; it did not count against the limit


def test_a_false_complaint_convicts_the_complainer_not_the_accused(tmp_path: Path) -> None:
    summary, _errors, coordinator = _run(tmp_path, FalseComplaint, active=False)
    assert set(coordinator._convicted) == {"evil"}
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message


DISTRIBUTED_DP = dict(dp="distributed", dp_clip=1.0, dp_noise_multiplier=0.5, dp_bits=24)


def test_a_wrong_unmasking_share_convicts_the_holder_and_the_round_completes(tmp_path: Path) -> None:
    """Before: 'failed' after one attempt (the honest sites declined every retry of the round); then
    the round was rejected in every round evil was drawn for, and nobody was convicted (a wrong share
    proved nothing about who lied). Now the share does not open its owner's commitment: evil's answer
    is refused, evil is convicted, and each round completes exactly from the three honest answers."""
    summary, _errors, coordinator = _run(tmp_path, WrongUnmaskingShare, active=True, min_clients=3,
                                         **DISTRIBUTED_DP)
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message
    assert summary.rejected_rounds == 0
    assert set(coordinator._convicted) == {"evil"}
    assert "did not commit to" in coordinator._convicted["evil"]
    # evil is out of the stage the moment its answer is refused: the round does not wait out the stage
    # deadline (30 s here) for an answer from a site it has caught lying (before: "missed the stage deadline")
    with RunStore(tmp_path / "run.sqlite") as store:
        drops = [(r, stage, why) for r, _attempt, name, stage, why in store.dropouts(coordinator.run_id)
                 if name == "evil"]
    assert [(r, stage) for r, stage, _why in drops] == [(1, "unmasking")], drops
    assert "did not commit to" in drops[0][2], drops


class _Dealer(threading.local):
    evil = False


DEALER = _Dealer()


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
def test_an_owner_whose_shares_do_not_reconstruct_is_convicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               active: bool) -> None:
    """evil deals one holder a share of its self-mask seed off the polynomial of the others, committed
    to and sealed like an honest share, so every holder accepts it, masks and returns it.
    Before: the server could not tell the dealer from the holders, so evil spoiled every round it was
    drawn for (the round was rejected each time). Now every returned share opens evil's commitment, so
    the inconsistency is evil's own: it is convicted, its round is rejected (the masks could not be
    removed after the release), and the next round completes without it. Under distributed DP, so that the
    four sites of round 1 may be drawn again: without user-level DP they decline a second release over the
    unchanged model (the test after this one)."""
    real_share = secagg_client.share

    def dealing(secrets: np.ndarray, xs: np.ndarray, threshold: int, seed: bytes | None = None) -> np.ndarray:
        shares = real_share(secrets, xs, threshold, seed=seed)
        if DEALER.evil:  # one holder's share of the self-mask seed moved off the polynomial
            shares[-1, 0] = (shares[-1, 0] + 1) % PRIME
        return shares

    monkeypatch.setattr(secagg_client, "share", dealing)
    summary, _errors, coordinator = _run(tmp_path, EvilDealer, active=active, min_clients=3, **DISTRIBUTED_DP)
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message
    assert summary.rejected_rounds == 1  # the one round evil was drawn for
    assert set(coordinator._convicted) == {"evil"}
    assert "dealt shares of its self-mask seed" in coordinator._convicted["evil"]
    with RunStore(tmp_path / "run.sqlite") as store:
        round_two = {name for _attempt, name, _sid, _stage in store.participants(coordinator.run_id, 2)}
    assert "evil" not in round_two


def test_without_user_level_dp_a_spoiled_round_does_not_end_the_job(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No DP: the honest sites of a rejected round released a sum over the model the next round keeps,
    and each declines every round over it (the replay defence). Before: the server drew them again, every
    attempt of round 2 was declined, and evil's one bad dealing ended the job ('failed', round 2 aborted
    --max-round-attempts times). Now the server draws round 2 from the sites that did not release over
    the model (8 sites, cohorts of 4; the job's seed puts evil in round 1's cohort)."""
    real_share = secagg_client.share

    def dealing(secrets: np.ndarray, xs: np.ndarray, threshold: int, seed: bytes | None = None) -> np.ndarray:
        shares = real_share(secrets, xs, threshold, seed=seed)
        if DEALER.evil:
            shares[-1, 0] = (shares[-1, 0] + 1) % PRIME
        return shares

    monkeypatch.setattr(secagg_client, "share", dealing)
    names = ["evil"] + [f"site-{i}" for i in range(7)]
    summary, _errors, coordinator = _run(tmp_path, EvilDealer, active=False, names=names, min_clients=3,
                                         clients_per_round=4, seed=7, insecure_deterministic=True)
    with RunStore(tmp_path / "run.sqlite") as store:
        rounds = {number: {(attempt, name) for attempt, name, _sid, _stage in store.participants(coordinator.run_id,
                                                                                               number)}
                  for number in (1, 2)}
    assert {name for _attempt, name in rounds[1]} >= {"evil"}  # the seed drew evil into round 1
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message
    assert summary.rejected_rounds == 1 and set(coordinator._convicted) == {"evil"}
    released = {name for _attempt, name in rounds[1]}
    assert not released & {name for _attempt, name in rounds[2]}  # round 2: none that released over the model
    assert coordinator._released_unchanged == {}  # the model changed: every site may be drawn again


def test_a_conviction_outlives_a_server_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: convictions lived in the coordinator's memory only, so a server killed after the
    round that convicted a site resumed the run and drew that site again. Now they are in the run
    store: the resumed run leaves the site out, though it now behaves."""
    first, _errors, coordinator = _run(tmp_path, GarbageBoxes, active=False, stop_after_round=1)
    assert first.status == "stopped" and first.completed_rounds == 1, first.message
    assert set(first.convicted) == {"evil"} and "share box" in first.convicted["evil"]

    second, errors, resumed = _run(tmp_path, InProcessTransport, active=False, new_run=False)
    assert not errors, errors
    assert resumed.run_id == coordinator.run_id and second.resumed_from == 1
    assert second.status == "completed" and second.completed_rounds == 2, second.message
    with RunStore(tmp_path / "run.sqlite") as store:
        round_two = {name for _attempt, name, _sid, _stage in store.participants(resumed.run_id, 2)}
        assert round_two == {"site-0", "site-1", "site-2"}  # all four were connected; evil was not drawn
        assert store.convictions(resumed.run_id) == first.convicted == second.convicted
    _print_summary(second.to_dict(), as_json=False)  # what `fedveil server` prints at the end
    assert f"convicted, left out of the rest of the run: evil ({first.convicted['evil']})" in capsys.readouterr().out


def test_the_round_after_a_conviction_draws_the_others_without_waiting_for_the_convicted(tmp_path: Path) -> None:
    """Before: with K = every enrolled site, each round after a conviction waited out ``--cohort-wait``
    for the convicted site, which may never be drawn again. Now the server draws as soon as every
    enrolled site that may be drawn is connected (an hour's wait here: the job would hang)."""
    with coordinator_watchdog(120.0) as watchdog:
        summary, _errors, coordinator = _run(tmp_path, GarbageBoxes, active=False, cohort_wait=3600.0,
                                             on_coordinator=watchdog)
    assert summary.status == "completed" and summary.completed_rounds == 2, summary.message
    assert set(summary.convicted) == {"evil"}
    with RunStore(tmp_path / "run.sqlite") as store:
        round_two = {name for _attempt, name, _sid, _stage in store.participants(coordinator.run_id, 2)}
    assert round_two == {"site-0", "site-1", "site-2"}


@pytest.mark.parametrize(("complaints", "field"), [
    ([], "complaints"),
    ([pb.ShareComplaint(sender_id=0, kind=pb.SHARE_COMPLAINT_KIND_UNSPECIFIED)], "complaints[0].kind"),
    ([pb.ShareComplaint(sender_id=0, kind=pb.SHARE_COMPLAINT_KIND_UNDECRYPTABLE)] * 9, "complaints"),
])
def test_a_malformed_complaint_is_refused_naming_the_field(complaints: list[pb.ShareComplaint], field: str) -> None:
    from fedveil.server.coordinator.misconduct import complaints_from_pb

    with pytest.raises(MalformedMessage, match=field.replace("[", r"\[").replace("]", r"\]")):
        complaints_from_pb(pb.ShareComplaintsRequest(complaints=complaints), cohort_size=4)
