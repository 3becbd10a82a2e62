"""A site whose credential the other sites refuse is not drawn into cohort after cohort (attacker review
of the sites, finding 3).

Before: a server started without ``--authority`` took any credential; one with the authority checked
credentials at Join only, against the revocation list it was started with. A site revoked or expired
since, or one the sites refuse for a reason the server cannot see (a revocation list the sites hold
and the server was not given), was drawn into every cohort; every honest site declined every such
roster, each attempt aborted ("only 0/1 clients accepted") and the job failed.

Now: active mode needs the authority; the server checks every site's credential again (expiry, and
the revocation list held now, read again when the ``--revocations`` file changes) at every cohort
draw; and a site that declines because of another member's credential names the member's slot
(``RoundResponse.refused_members``), so that a member more decliners refuse than the round's
tolerated colluders is barred from the round's later attempts. One malicious site naming honest
members bars nobody.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fedveil
from fedveil.clients import Federation, run_client
from fedveil.clients.admission import CohortRefused, check_identities
from fedveil.clients.api import evaluator
from fedveil.clients.backoff import BackoffPolicy
from fedveil.clients.options import ClientOptions
from fedveil.commands.server import _print_summary
from fedveil.front_doors import FrontDoorError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage
from fedveil.protocol.identity_files import replace_file
from fedveil.protocol.revocation_file import RevocationFile
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg.identity import RevocationList, issue_credential, issue_revocations
from fedveil.server.config import ServerConfigError
from fedveil.server.coordinator import Coordinator
from fedveil.server.coordinator.refusal_tally import refused_slots, roster_entry_digest, tolerated_refusers
from fedveil.server.coordinator.state import JobSummary, _Client
from fedveil.server.events import JobEvent, RoundCompleted, RoundStarted
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, CONSORTIUM, DAY, RESPONSIVE_DEADLINES, Consortium, job_config, run_job

pytestmark = pytest.mark.timeout(180)
NAMES = ["a", "b", "c", "evil"]
EVIL = 3


def _revocations(consortium: Consortium, version: int, *revoked: str) -> RevocationList:
    return issue_revocations(consortium.authority, CONSORTIUM, version=version, issued_at=int(time.time()),
                             revoked=[consortium.credentials[n].serial for n in revoked])


class Cohorts:
    """Listener: each attempt's cohort; ``after_round_1`` runs once round 1 is released."""

    def __init__(self, after_round_1: Any = None) -> None:
        self.started: list[tuple[int, int, tuple[str, ...]]] = []
        self.after_round_1 = after_round_1

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, RoundStarted):
            self.started.append((event.round, event.attempt, tuple(event.cohort)))
        elif isinstance(event, RoundCompleted) and event.round == 1 and self.after_round_1 is not None:
            self.after_round_1()

    def with_evil(self, number: int) -> list[int]:
        return [attempt for r, attempt, cohort in self.started if r == number and "evil" in cohort]


def site(name: str, consortium: Consortium, transport: type[InProcessTransport] = InProcessTransport,
         give_up_after_s: float = 20.0, **options: Any) -> Any:
    """A site running the unmodified client loop (``run_client``); an error names the site."""
    index = NAMES.index(name)

    def go(service: Any) -> Any:
        data = synthetic.synthetic_data(index, len(NAMES), 3)
        opts = consortium.options(name, seed=100 + index, num_examples=len(data), evaluate=evaluator(synthetic, data),
                                  poll_wait_ms=300, backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=0.3,
                                                                          give_up_after_s=give_up_after_s), **options)
        fed = Federation(transport(service, name), synthetic.name, synthetic.build_model(), opts)
        try:
            return name, fed, run_client(fed, synthetic, data)
        except Exception as err:
            raise RuntimeError(f"{name}: {err}") from err
    return go


def config(**kw: Any) -> Any:
    """Four sites drawn together, three enough (a barred or refused site leaves three); the tests count
    attempts, and nothing in them is meant to time out (long deadlines, so a loaded machine cannot add one)."""
    return job_config(**{"rounds": 2, "clients_per_round": 4, "min_clients": 3, "cohort_wait": ALL_JOIN_WAIT,
                         **RESPONSIVE_DEADLINES, **kw})


# -- (a) active mode needs the authority ----------------------------------------------------------

def test_an_active_job_without_the_authority_is_refused_naming_the_field(tmp_path: Path, capsys: Any) -> None:
    from fedveil.cli import main

    with RunStore(tmp_path / "run.sqlite") as store:
        with pytest.raises(ServerConfigError, match="authority_public_key") as err:
            Coordinator(job_config(authority_public_key=""), synthetic, store, new_run=True)
        assert err.value.flag == "--authority"
        Coordinator(job_config(authority_public_key="", active_adversary=False), synthetic, store, new_run=True)
    with pytest.raises(FrontDoorError, match="authority: active-adversary mode") as refused:
        fedveil.serve(job_config(authority_public_key=""), store=tmp_path / "f.db", listen="127.0.0.1:0", insecure=True)
    assert refused.value.field == "authority" and not (tmp_path / "f.db").exists()
    code = main(["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s.db"), "--task",
                 "fedveil.tasks.synthetic:task", "--rounds", "1", "--clients-per-round", "2", "--insecure"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --authority: active-adversary mode")


# -- (b), (c) the server checks every credential again at each draw -----------------------------------

@pytest.mark.slow
def test_a_site_revoked_mid_job_is_not_drawn_again_and_the_job_completes(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    consortium = Consortium.create(NAMES)
    path = tmp_path / "revocations.bin"
    replace_file(path, _revocations(consortium, 1).encode())  # the list the server starts with: nobody revoked
    cohorts = Cohorts(lambda: replace_file(path, _revocations(consortium, 2, "evil").encode()))

    def watching(coordinator: Coordinator) -> Coordinator:
        coordinator.watch_revocations(path)
        coordinator.listeners.add(cohorts)
        return coordinator

    # the honest sites never hear of the revocation: only the server's own check keeps evil out
    with caplog.at_level(logging.WARNING, logger="fedveil.server"):
        summary, results, errors = run_job(tmp_path, config(), synthetic, [site(n, consortium) for n in NAMES],
                                           service=watching, enrolled=NAMES)
    assert summary.status == "completed" and summary.completed_rounds == 2, summary
    assert cohorts.with_evil(1) and not cohorts.with_evil(2), cohorts.started
    assert [str(e) for e in errors] == [str(errors[0])] and str(errors[0]).startswith("evil:"), errors
    assert "revoked" in str(errors[0])
    assert "client evil is not drawn again and its session is closed" in caplog.text
    assert all(r is not None for r in results[:3])


@pytest.mark.slow
def test_a_credential_that_expires_mid_job_is_not_drawn_again(tmp_path: Path) -> None:
    consortium = Consortium.create(NAMES)
    now = int(time.time())
    key = consortium.keys["evil"].public_key().public_bytes_raw()
    consortium.credentials["evil"] = issue_credential(consortium.authority, CONSORTIUM, "evil", key,
                                                      not_before=now - DAY, not_after=now + 3600)
    # the server's clock moves two hours on after round 1 (the sites' clocks do not: for them evil is valid)
    ahead = [0.0]
    cohorts = Cohorts(lambda: ahead.__setitem__(0, 7200.0))
    coordinator_cls = functools.partial(Coordinator, wall_clock=lambda: time.time() + ahead[0])

    def listening(coordinator: Coordinator) -> Coordinator:
        coordinator.listeners.add(cohorts)
        return coordinator

    summary, _results, errors = run_job(tmp_path, config(), synthetic, [site(n, consortium) for n in NAMES],
                                        service=listening, coordinator_cls=coordinator_cls, enrolled=NAMES)  # type: ignore[arg-type]
    assert summary.status == "completed" and summary.completed_rounds == 2, summary
    assert cohorts.with_evil(1) and not cohorts.with_evil(2), cohorts.started
    assert len(errors) == 1 and str(errors[0]).startswith("evil:") and "expired" in str(errors[0]), errors


# -- (d) a credential only the sites can refuse: the slot their declines name is barred ---------------

@pytest.mark.slow
def test_a_member_every_honest_site_refuses_is_barred_after_one_aborted_attempt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sites got the authority's list revoking evil out of band; the server was not given it."""
    consortium = Consortium.create(NAMES)
    revoked = _revocations(consortium, 1, "evil")
    sites = [site(n, consortium, policy=consortium.policy(revocations=revoked)) for n in NAMES[:3]]
    cohorts = Cohorts()

    def listening(coordinator: Coordinator) -> Coordinator:
        coordinator.listeners.add(cohorts)
        return coordinator

    # one attempt per round: the attempts evil cost do not count against it
    with caplog.at_level(logging.WARNING, logger="fedveil.server"):
        summary, results, errors = run_job(tmp_path, config(max_round_attempts=1), synthetic,
                                           [*sites, site("evil", consortium)], service=listening, enrolled=NAMES)
    assert errors == []
    assert summary.status == "completed" and summary.completed_rounds == 2, summary
    # barred for the rest of the job (it was drawn into round 2's first attempt too, before)
    assert summary.aborted_attempts == 1
    assert cohorts.with_evil(1) == [1] and cohorts.with_evil(2) == [], cohorts.started
    assert caplog.text.count("evil is barred from the rest of the job until it joins with another credential: "
                             "3 of the cohort's 4 members") == 1
    declined = [o for _name, _fed, history in results[:3] for o in history if o.outcome == "declined"]
    assert len(declined) == 3 and all("revoked" in o.reason for o in declined)


@pytest.mark.slow
def test_a_bar_outlives_a_server_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server stops after round 1 and is started again on its store: round 2 of the resumed run is
    drawn without evil at once (before the bar was kept, it cost one more aborted attempt)."""
    consortium = Consortium.create(NAMES)
    revoked = _revocations(consortium, 1, "evil")
    held: list[Coordinator] = []

    def job(after_round_1: Any = None) -> tuple[Any, Cohorts]:
        cohorts = Cohorts(after_round_1)

        def listening(coordinator: Coordinator) -> Coordinator:
            held.append(coordinator)
            coordinator.listeners.add(cohorts)
            return coordinator

        # the stopped server's sites give up on it after 3 s of refused calls (the resumed run's after 20 s)
        patience = 3.0 if after_round_1 is not None else 20.0
        sites = [site(n, consortium, give_up_after_s=patience, policy=consortium.policy(revocations=revoked))
                 for n in NAMES[:3]]
        summary, _results, errors = run_job(tmp_path, config(max_round_attempts=1), synthetic,
                                            [*sites, site("evil", consortium, give_up_after_s=patience)],
                                            service=listening, new_run=after_round_1 is not None, enrolled=NAMES)
        # the sites of the stopped server give up on it; those of the resumed run finish
        assert after_round_1 is not None or errors == [], errors
        return summary, cohorts

    first, cohorts = job(after_round_1=lambda: held[0].stop())  # the in-process stand-in for a killed server
    assert first.status == "stopped" and first.completed_rounds == 1, first.message
    assert cohorts.with_evil(1) == [1] and first.aborted_attempts == 1, cohorts.started
    assert list(first.barred) == ["evil"] and "declined for its credential" in first.barred["evil"]

    second, cohorts = job()
    assert held[1].run_id == held[0].run_id and second.resumed_from == 1
    assert second.status == "completed" and second.completed_rounds == 2, second.message
    # one attempt, without evil; the run's aborted attempts are still round 1's one
    assert [(r, attempt) for r, attempt, _cohort in cohorts.started] == [(2, 1)], cohorts.started
    assert cohorts.with_evil(2) == [] and second.aborted_attempts == 1, cohorts.started
    assert list(second.barred) == ["evil"] and second.bars_lifted == ()  # evil kept its refused credential
    _print_summary(second.to_dict(), as_json=False)  # what `fedveil server` prints at the end
    assert (f"barred while it presents the credential the sites refused: evil ({second.barred['evil']})"
            in capsys.readouterr().out)
    # a server started once more on the finished run reports it, bars included
    with RunStore(tmp_path / "run.sqlite") as store:
        again = Coordinator(config(max_round_attempts=1, linger=0.0), synthetic, store, new_run=False).run()
    assert "already finished" in again.message and again.barred == second.barred and again.bars_lifted == ()


def test_the_summary_says_which_bars_had_lifted(capsys: pytest.CaptureFixture[str]) -> None:
    summary = JobSummary(run_id="r", status="completed", completed_rounds=2, total_rounds=2, resumed_from=0,
                         aborted_attempts=1, dropouts=0, final_metrics={}, epsilon=None, delta=None, message="done",
                         barred={"evil": "declined in round 1", "odd": "declined in round 2"}, bars_lifted=("odd",))
    assert summary.to_dict()["bars_lifted"] == ["odd"]
    _print_summary(summary.to_dict(), as_json=False)
    out = capsys.readouterr().out
    assert "barred while it presents the credential the sites refused: evil (declined in round 1)" in out
    assert "barred, lifted when it joined again with another credential: odd (declined in round 2)" in out
    assert "refused: odd" not in out


# -- (e) a decliner's claim alone bars nobody ---------------------------------------------------------

class Accuser(InProcessTransport):
    """A malicious site: declines every round, naming every other member as refused."""

    def __init__(self, service: Any, name: str) -> None:
        super().__init__(service, name)
        self.slots: tuple[int, int] = (0, 0)
        self.named: list[list[int]] = []

    def poll(self, request: pb.PollRequest) -> pb.PollResponse:
        response = super().poll(request)
        if response.WhichOneof("instruction") == "round_start":
            self.slots = (int(response.round_start.secagg.cohort_size), int(response.round_start.client_id))
        return response

    def respond_to_round(self, request: pb.RoundResponse) -> pb.Ack:
        n, own = self.slots
        request.accept = False
        request.decline_reason = "policy: secagg.identity_credentials: everyone else is revoked (a lie)"
        request.refused_members[:] = [s for s in range(n) if s != own]
        self.named.append(list(request.refused_members))
        return super().respond_to_round(request)


class DeclinesOnce(InProcessTransport):
    """An honest site that sits the first attempt out (so that it aborts at COMMIT), naming nobody."""

    declined = False

    def respond_to_round(self, request: pb.RoundResponse) -> pb.Ack:
        if request.accept and not self.declined:
            self.declined = True
            request = pb.RoundResponse(header=request.header, accept=False, decline_reason="busy")
        return super().respond_to_round(request)


def test_one_site_naming_every_honest_member_bars_nobody(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    consortium = Consortium.create(NAMES)
    accusers: list[Accuser] = []
    held: list[Coordinator] = []

    class Recorded(Accuser):
        def __init__(self, service: Any, name: str) -> None:
            super().__init__(service, name)
            accusers.append(self)

    def holding(coordinator: Coordinator) -> Coordinator:
        held.append(coordinator)
        return coordinator

    sites = [site("a", consortium), site("b", consortium), site("c", consortium, DeclinesOnce),
             site("evil", consortium, Recorded)]
    with caplog.at_level(logging.INFO, logger="fedveil.server"):
        summary, _results, _errors = run_job(tmp_path, config(rounds=1), synthetic, sites, service=holding)
    assert accusers and accusers[0].named and accusers[0].named[0] == [0, 1, 2]
    # attempt 1: a and b accept, c sits out, evil names a, b and c: too few accept, the attempt aborts
    assert summary.aborted_attempts == 1
    assert "not barred (at most 1 decliners may collude)" in caplog.text
    assert not held[0]._barred.get(1) and not held[0]._refused_entries
    # attempt 2: a, b and c (each named once, by evil alone) are drawn again and release the round
    assert summary.status == "completed" and summary.completed_rounds == 1, summary


# -- the parts --------------------------------------------------------------------------------------

def test_declines_name_only_other_members_once_each() -> None:
    assert refused_slots([3, 1], 4, 0) == frozenset({1, 3})
    for values, problem in (([4], "refused_members\\[0\\]: slot 4 is outside the cohort 0..3"),
                            ([1, 0], "refused_members\\[1\\]: slot 0 is the decliner's own"),
                            ([2, 2], "refused_members\\[1\\]: slot 2 appears twice")):
        with pytest.raises(MalformedMessage, match=problem):
            refused_slots(values, 4, 0)
    assert [tolerated_refusers(n, 1 / 3) for n in (3, 4, 9, 10)] == [1, 1, 3, 3]
    assert tolerated_refusers(4, 0.0) == 1


def test_a_bar_holds_while_the_site_presents_the_refused_entry_and_lifts_with_a_new_credential(
        tmp_path: Path) -> None:
    """The bar is on the roster entry the decliners refused, not the name: a site that joins again
    with a credential the authority issued anew (and the sites do not refuse) is drawn again."""
    with RunStore(tmp_path / "run.sqlite") as store:
        coordinator = Coordinator(config(), synthetic, store, new_run=True)
        with coordinator._cond:
            coordinator._clients["evil"] = _Client("evil", b"s", credential=b"revoked credential", identity_key=b"k")
            why = "was declined for its credential or identity key by 3 of 4 members in round 1"
            coordinator._refused_entries["evil"] = (roster_entry_digest(b"revoked credential", b"k"), why)
            assert coordinator._excluded(2) == {"evil"} and coordinator._exclusion_reasons(2) == f"evil {why}"
            assert coordinator._lifted_bars() == set()
            coordinator._clients["evil"].identity_key = b"another key"  # the same credential, another key
            assert coordinator._excluded(2) == set() and coordinator._lifted_bars() == {"evil"}
            coordinator._clients["evil"] = _Client("evil", b"t", credential=b"reissued credential", identity_key=b"k")
            assert coordinator._excluded(2) == set() and coordinator._exclusion_reasons(2) == ""
            assert coordinator._lifted_bars() == {"evil"}
            del coordinator._clients["evil"]  # no session: nothing shows another entry, so the bar stands
            assert coordinator._lifted_bars() == set()
    assert roster_entry_digest(b"ab", b"c") != roster_entry_digest(b"a", b"bc")  # the split is bound


def test_the_bar_is_on_the_entry_the_roster_showed_not_the_session_at_the_abort(tmp_path: Path) -> None:
    """evil joined again with a new credential after the roster went out: the decliners refused the
    old one, so the old one is barred and the new one is drawn."""
    with RunStore(tmp_path / "run.sqlite") as store:
        coordinator = Coordinator(config(), synthetic, store, new_run=True)
        names = dict(enumerate(NAMES))
        keys = tuple(n.encode() * 8 for n in NAMES)
        rnd: Any = SimpleNamespace(
            number=1, attempt=1, names=names, cohort={n: i for i, n in names.items()},
            refusals={0: frozenset({EVIL}), 1: frozenset({EVIL}), 2: frozenset({EVIL}), EVIL: frozenset()},
            roster_credentials=tuple(f"credential of {n}".encode() for n in NAMES),
            config=SimpleNamespace(active=True, identity_keys=keys, max_corrupt_fraction=1 / 3))
        with coordinator._cond:
            coordinator._clients["evil"] = _Client("evil", b"t", credential=b"reissued", identity_key=keys[EVIL])
            assert coordinator._bar_refused_members(rnd)
            barred = roster_entry_digest(b"credential of evil", keys[EVIL])
            assert coordinator._refused_entries["evil"][0] == barred
            assert coordinator._excluded(2) == set()  # its session now presents the reissued credential
            assert store.credential_bars(coordinator.run_id)["evil"][0] == barred
            rnd.config.active = False  # a passive roster shows no credentials: a decline cannot name one
            coordinator._refused_entries.clear()
            assert not coordinator._bar_refused_members(rnd) and not coordinator._refused_entries


def _roster(consortium: Consortium, client_id: int = 0) -> pb.RoundStart:
    creds = [consortium.credentials[n] for n in NAMES]
    return pb.RoundStart(client_id=client_id, secagg=pb.SecAggParams(
        cohort_size=len(NAMES), identity_keys=[c.identity_public_key for c in creds],
        identity_credentials=[c.encode() for c in creds], active_adversary=True))


def test_a_site_names_the_members_whose_credential_or_key_it_refuses() -> None:
    consortium = Consortium.create(NAMES)
    own = consortium.keys["a"].public_key().public_bytes_raw()
    now = int(time.time())

    def refused(start: pb.RoundStart, **policy: Any) -> tuple[int, ...]:
        with pytest.raises(CohortRefused) as err:
            check_identities(consortium.policy(**policy), start, own_name="a", own_key=own, now=now)
        return err.value.members

    assert refused(_roster(consortium), revocations=_revocations(consortium, 1, "evil", "b")) == (1, EVIL)
    assert refused(_roster(consortium), revocations=_revocations(consortium, 1, "a")) == ()  # its own: nobody else
    swapped = _roster(consortium)
    swapped.secagg.identity_keys[2] = consortium.keys["b"].public_key().public_bytes_raw()
    assert refused(swapped) == (2,)
    twice = _roster(consortium)
    twice.secagg.identity_credentials[2] = twice.secagg.identity_credentials[1]
    twice.secagg.identity_keys[2] = twice.secagg.identity_keys[1]
    assert refused(twice) == (1, 2)


def test_the_revocation_file_is_read_again_and_a_bad_one_keeps_the_last_good_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    consortium = Consortium.create(NAMES)
    path = tmp_path / "revocations.bin"
    replace_file(path, _revocations(consortium, 1).encode())
    watched = RevocationFile(path, consortium.authority_public, CONSORTIUM)
    assert watched.refresh().version == 1
    replace_file(path, _revocations(consortium, 2, "evil").encode())
    assert watched.refresh().revoked == {consortium.credentials["evil"].serial}
    with caplog.at_level(logging.ERROR, logger="fedveil.server"):
        replace_file(path, b"not a revocation list")
        assert watched.refresh().version == 2
        assert "does not verify" in caplog.text and "keeping revocation list version 2" in caplog.text
        replace_file(path, _revocations(consortium, 1).encode())  # a roll-back
        assert watched.refresh().version == 2
        assert "older than version 2" in caplog.text
        path.unlink()
        assert watched.refresh().version == 2
    replace_file(path, _revocations(consortium, 3, "evil", "b").encode())
    assert watched.refresh().version == 3
    with RunStore(tmp_path / "run.sqlite") as store:
        passive = Coordinator(job_config(authority_public_key="", active_adversary=False), synthetic, store,
                              new_run=True)
        with pytest.raises(ServerConfigError, match="needs --authority"):
            passive.watch_revocations(path)


def test_a_running_site_reads_its_revocation_file_again(tmp_path: Path) -> None:
    """Review of 2026-12-07: a site kept the list it started with until it restarted, so a key the authority
    had revoked stayed acceptable to it while a malicious server kept drawing its holder."""
    consortium = Consortium.create(NAMES)
    path = tmp_path / "revocations.bin"
    replace_file(path, _revocations(consortium, 1).encode())
    options = ClientOptions(policy=consortium.policy(revocations=_revocations(consortium, 1)),
                                    revocations_path=path)
    site = Federation(InProcessTransport(None, "a"), synthetic.name, synthetic.build_model(), options)
    site._refresh_revocations()
    assert site.policy.revocations is not None and site.policy.revocations.version == 1
    replace_file(path, _revocations(consortium, 2, "evil").encode())
    site._refresh_revocations()
    assert site.policy.revocations.version == 2
    assert consortium.credentials["evil"].serial in site.policy.revocations.revoked
    replace_file(path, _revocations(consortium, 1).encode())  # a roll-back is not taken
    site._refresh_revocations()
    assert site.policy.revocations.version == 2


@pytest.mark.slow
def test_a_revocation_file_replaced_mid_job_counts_from_the_next_round(tmp_path: Path) -> None:
    """The same, end to end: round 1 with evil in the cohort; then the sites' file is replaced with a list
    that revokes evil's key (the server, which holds no list, keeps drawing it): in round 2 every honest
    site declines a cohort with evil, naming the revocation, without a restart."""
    consortium = Consortium.create(NAMES)
    path = tmp_path / "revocations.bin"
    replace_file(path, _revocations(consortium, 1).encode())
    cohorts = Cohorts(after_round_1=lambda: replace_file(path, _revocations(consortium, 2, "evil").encode()))

    def listening(coordinator: Coordinator) -> Coordinator:
        coordinator.listeners.add(cohorts)
        return coordinator

    sites = [site(n, consortium, policy=consortium.policy(revocations=_revocations(consortium, 1)),
                  revocations_path=path) for n in NAMES[:3]]
    summary, results, errors = run_job(tmp_path, config(max_round_attempts=1), synthetic,
                                       [*sites, site("evil", consortium)], service=listening, enrolled=NAMES)
    assert errors == [] and summary.status == "completed" and summary.completed_rounds == 2, summary
    assert cohorts.with_evil(1) == [1]
    declined = [o for _name, _fed, history in results[:3] for o in history if o.outcome == "declined"]
    assert declined and all(o.round == 2 and "revoked" in o.reason for o in declined)
