"""What a site remembers of a job, in its own hands: attempts joined, releases, its own privacy ledger.

The server's claims never enter here. Three things a deviating server could exploit are
bounded by this record:

- **retry differencing** — once the site has sent its unmasking shares for one attempt of
  round r, the server could have the sum; a site that sent a second masked input for round r
  would let ``sum(attempt 1) − sum(attempt 2)`` isolate inputs, so every later attempt of round
  r (or of an earlier round) is declined;
- **layout grinding** — each attempt shows the server another random graph layout, so the
  attempts a site joins per round are capped by its policy;
- **unaccounted releases** — every attempt in which the site sent a masked input counts as a
  release in the site's own ledger, whatever the server says happened next;
- **more rounds than accounted** — the job's round count R is pinned at the site's first join of
  a run: rounds outside 1..R (R + 1 only for the final evaluation-only round) are declined, and a
  server that later announces a bigger R is refused, so the server cannot difference more
  cohorts than the site planned its budget for;
- **evaluation oracles** — evaluation-only rounds and per-site final evaluations of one job are
  capped (``max_evaluations_per_job``);
- **a budget that forgets** — every round's DP-SGD steps are saved with the run they belong to,
  and a client restarted in the middle of that run composes them into its new accountant
  (:meth:`SiteState.local_dp_events`), so its own ε budget still bounds the whole job;
- **job after job** — a per-job budget starts again in every run; with the policy's
  ``max_lifetime_local_epsilon`` the site composes the DP-SGD steps of every job saved here with
  the round it is asked for (:meth:`SiteState.lifetime_local_epsilon`) and declines past the cap;
  with ``max_user_epsilon`` it does the same for its user-level releases
  (:meth:`SiteState.user_epsilon_after`), whatever number of rounds the server announces;
- **model replay** — the digest of every global model the site released a sum over is kept: a
  server that shows the same model again in another round (a "rejected" round it did not apply,
  then a cohort without the victim) would get the same update and metrics twice and difference
  the sums, so a release without noise the site relies on is refused over a model seen before
  (:func:`fedveil.clients.admission.admit_round`).

The site's ledger (a :class:`fedveil.dp.ledger.PrivacyLedger`, party ``"federation"`` for the
user level as the site can guarantee it) records, per release, the noise the site can rely on:
its own noise share and what the other honest contributors must add at least (distributed DP),
the server's announced noise only if the site trusts the server (central DP), and nothing at all
otherwise — such releases are listed as unprotected and make the user-level ε infinite. No
sampling amplification is claimed: the site cannot check how cohorts are drawn.

Persistence: an optional JSON file (no secrets in it), written atomically after each change, so a
restarted client keeps refusing retries of rounds it already released.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedveil.dp.accounting import DpEvent
from fedveil.dp.ledger import FEDERATION, LedgerConfig, LedgerFormatError, PrivacyLedger
from fedveil.errors import FedveilError

STATE_FORMAT = "fedveil.site_state"
SITE_PARTY = "this-site"
"""The ledger party of the site's own DP-SGD (sample level); ``"federation"`` holds its user level."""
STATE_VERSION = 1


class SiteStateError(FedveilError, ValueError):
    """The site state file cannot be read or written; the message names the path."""


@dataclass
class RoundRecord:
    """One round number of one run, as this site took part in it."""

    attempts: int = 0
    evaluations: int = 0
    released: bool = False
    """The site sent its unmasking shares for an attempt of this round."""


@dataclass
class JobRecord:
    """One run as this site joined it: the round count pinned at its first join, evaluations answered."""

    total_rounds: int
    evaluations: int = 0


@dataclass(frozen=True)
class Release:
    """One attempt in which the site's masked input left it."""

    run_id: str
    round: int
    attempt: int
    dp_mode: str
    protected: bool
    """False when the site can rely on no user-level noise for this release."""
    note: str = ""


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock between processes
    fcntl = None  # type: ignore[assignment]

_HELD: dict[Path, int] = {}
"""State files this process holds (resolved path → the open, locked lock file), for its lifetime."""
_HELD_GUARD = threading.Lock()


def hold_exclusively(path: Path) -> None:
    """One process per state file. Each client keeps the file in memory and rewrites it whole, so a
    second process on the same file would overwrite the first's records and check the lifetime and
    user-level caps against its own copy: two jobs at ε 2.84 each passed a cap of 3.2, and the file
    then held one of them (review of 2026-12-07). The lock (``.<name>.lock`` beside the file) lasts as
    long as the process; opening the file again in the same process needs no second lock."""
    if fcntl is None:  # pragma: no cover
        return
    key = path.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            return
        lock = key.with_name(f".{key.name}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise SiteStateError(f"site state {str(path)!r}: its lock file {str(lock)!r} cannot be opened "
                                 f"({err.strerror})", field="state") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SiteStateError(f"site state {str(path)!r} is in use by another client process: run one client "
                                 "per state file at a time (a second one would overwrite the first's ledger and "
                                 "check the privacy caps against a stale copy)", field="state") from None
        _HELD[key] = fd


@dataclass
class SiteState:
    """Attempts, releases and the site's own user-level ledger for the runs it joined."""

    path: Path | None = None
    delta: float = 1e-5
    rounds: dict[str, dict[int, RoundRecord]] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    releases: list[Release] = field(default_factory=list)
    released_models: dict[str, set[str]] = field(default_factory=dict)
    """run → SHA-256 (hex) of every global model this site released a sum over (trained or evaluated)."""
    ledger: PrivacyLedger = field(default_factory=lambda: PrivacyLedger(LedgerConfig(accountant="rdp")))

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | None, *, delta: float = 1e-5, exclusive: bool = False) -> SiteState:
        """The state at ``path`` (created on first save), or an in-memory state for ``None``.
        ``exclusive``: a client that will write it holds it for this process (:func:`hold_exclusively`);
        readers such as ``fedveil budget report`` do not."""
        if exclusive and path is not None:
            hold_exclusively(path)
        state = cls(path=path, delta=delta)
        state.ledger = PrivacyLedger(LedgerConfig(accountant="rdp", federation_delta=delta, client_delta=delta))
        if path is None or not path.exists():
            return state
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SiteStateError(f"site state {str(path)!r} cannot be read ({err})") from None
        try:
            state._load(data)
        except (KeyError, TypeError, ValueError, LedgerFormatError) as err:
            raise SiteStateError(f"site state {str(path)!r} is malformed ({err})") from None
        return state

    def _load(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} document")
        for run_id, rounds in data["rounds"].items():
            self.rounds[str(run_id)] = {int(r): RoundRecord(int(v["attempts"]), int(v["evaluations"]),
                                                            bool(v["released"])) for r, v in rounds.items()}
        for run_id, job in data.get("jobs", {}).items():
            self.jobs[str(run_id)] = JobRecord(int(job["total_rounds"]), int(job["evaluations"]))
        self.released_models = {str(run): {str(d) for d in digests}
                                for run, digests in data.get("released_models", {}).items()}
        self.releases = [Release(str(r["run_id"]), int(r["round"]), int(r["attempt"]), str(r["dp_mode"]),
                                 bool(r["protected"]), str(r.get("note", ""))) for r in data["releases"]]
        self.ledger = PrivacyLedger.from_json(json.dumps(data["ledger"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "rounds": {run: {str(r): {"attempts": v.attempts, "evaluations": v.evaluations, "released": v.released}
                             for r, v in rounds.items()} for run, rounds in self.rounds.items()},
            "jobs": {run: {"total_rounds": j.total_rounds, "evaluations": j.evaluations}
                     for run, j in self.jobs.items()},
            "releases": [r.__dict__ for r in self.releases],
            "released_models": {run: sorted(d) for run, d in self.released_models.items()},
            "ledger": self.ledger.to_dict(),
        }

    def save(self) -> None:
        if self.path is None:
            return
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True)
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=".site-state-", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            raise SiteStateError(f"site state {str(self.path)!r} cannot be written ({err.strerror})") from None

    # -- the rules ------------------------------------------------------------------------------
    def record(self, run_id: str, round_number: int) -> RoundRecord:
        return self.rounds.setdefault(run_id, {}).setdefault(round_number, RoundRecord())

    def last_released_round(self, run_id: str) -> int:
        released = [r for r, rec in self.rounds.get(run_id, {}).items() if rec.released]
        return max(released, default=0)

    def pin_job(self, run_id: str, total_rounds: int) -> str | None:
        """Pin the job's round count at the first join of ``run_id``; on later joins, why the job as
        announced now must be refused (more rounds than pinned), or ``None``."""
        job = self.jobs.get(run_id)
        if job is None:
            if total_rounds < 1:
                return f"the job announces {total_rounds} rounds; a site pins a positive round count"
            self.jobs[run_id] = JobRecord(total_rounds)
            self.save()
            return None
        if total_rounds > job.total_rounds:
            return (f"the job now announces {total_rounds} rounds; this site joined it for {job.total_rounds} and "
                    "its privacy accounting covers no more")
        return None

    def admission_refusal(self, run_id: str, round_number: int, max_attempts: int, *, evaluation_only: bool = False,
                          max_evaluations_per_job: int | None = None) -> str | None:
        """Why this site must decline an attempt of ``round_number``, or ``None``.

        With a pinned job (:meth:`pin_job`) the round must lie in 1..R, or be R + 1 for an
        evaluation-only round; evaluation-only rounds also need ``max_evaluations_per_job`` left.
        """
        job = self.jobs.get(run_id)
        if job is not None and job.total_rounds > 0:
            last_allowed = job.total_rounds + (1 if evaluation_only else 0)
            if not 1 <= round_number <= last_allowed:
                return (f"round {round_number} is outside the job's rounds 1..{job.total_rounds}"
                        f"{' (+1 for the final evaluation)' if evaluation_only else ''} pinned when this site joined")
        if evaluation_only and max_evaluations_per_job is not None \
                and self.job_evaluations(run_id) >= max_evaluations_per_job:
            return (f"round {round_number}: this site already answered {self.job_evaluations(run_id)} evaluation "
                    f"request(s) of this job, its policy's maximum (max_evaluations_per_job={max_evaluations_per_job})")
        last = self.last_released_round(run_id)
        if round_number <= last:
            return (f"round {round_number}: this site already released its unmasking shares for round {last}; "
                    "another masked input for it could be differenced against the first")
        rec = self.rounds.get(run_id, {}).get(round_number)
        if rec is not None and rec.attempts >= max_attempts:
            return (f"round {round_number}: this site already joined {rec.attempts} attempt(s) of it, its policy's "
                    f"maximum (max_attempts_per_round={max_attempts})")
        return None

    def released_over(self, model_digest: bytes) -> bool:
        """Whether this site already released a sum over the global model ``model_digest``, in any run:
        a server that starts a new run from the same model could difference it against the old one."""
        if not model_digest:
            raise ValueError("model_digest: empty (the site computes it from the model it received)")
        digest = model_digest.hex()
        return any(digest in digests for digests in self.released_models.values())

    def joined(self, run_id: str, round_number: int) -> None:
        self.record(run_id, round_number).attempts += 1
        self.save()

    def evaluations_left(self, run_id: str, round_number: int, limit: int) -> bool:
        """Whether this site may evaluate another model in ``round_number`` (nothing counted)."""
        rec = self.rounds.get(run_id, {}).get(round_number)
        return (rec.evaluations if rec is not None else 0) < limit

    def evaluated(self, run_id: str, round_number: int, limit: int) -> bool:
        """Count an evaluation of a received model; False (and nothing counted) over ``limit``."""
        rec = self.record(run_id, round_number)
        if rec.evaluations >= limit:
            return False
        rec.evaluations += 1
        self.save()
        return True

    def job_evaluations(self, run_id: str) -> int:
        job = self.jobs.get(run_id)
        return job.evaluations if job is not None else 0

    def evaluated_for_job(self, run_id: str, limit: int) -> bool:
        """Count an answered evaluation request (evaluation-only round, final evaluation) of the job;
        False (and nothing counted) over ``limit``."""
        job = self.jobs.setdefault(run_id, JobRecord(0))
        if job.evaluations >= limit:
            return False
        job.evaluations += 1
        self.save()
        return True

    def released(self, run_id: str, round_number: int, model_digest: bytes) -> None:
        """The site sent its unmasking shares for an attempt of ``round_number``, whose sum was over the
        global model ``model_digest`` (its update and evaluation): that model is never used again."""
        if not model_digest:
            raise ValueError("model_digest: empty (the site computes it from the model it received)")
        self.record(run_id, round_number).released = True
        self.released_models.setdefault(run_id, set()).add(model_digest.hex())
        self.save()

    def sent_masked_input(self, release: Release, event: DpEvent | None, details: dict[str, Any]) -> None:
        """Record a release; ``event`` is the user-level noise the site can rely on (None: unprotected)."""
        self.releases.append(release)
        if event is not None:
            self.ledger.record(self._ledger_round(release.run_id, release.round), federation=event,
                               mechanism=f"{release.dp_mode} (site view)",
                               details={"run_id": release.run_id, "round": release.round, "attempt": release.attempt,
                                        **details})
        self.save()

    def trained_with_local_dp(self, run_id: str, round_number: int, event: DpEvent) -> None:
        """The site's DP-SGD steps of one round (sample level), from its own accountant's event."""
        self.ledger.record(self._ledger_round(run_id, round_number), clients={SITE_PARTY: event},
                           client_mechanism="dp-sgd", client_details={"run_id": run_id, "round": round_number})
        self.save()

    def _ledger_round(self, run_id: str, round_number: int) -> int:
        """The ledger's round index for ``round_number`` of ``run_id``. The ledger takes each party's rounds
        in order, but this one spans every job the site joins, and each job counts from round 1 again:
        a run whose rounds would come before the ledger's last is shifted past it, by one offset for
        the whole run (its own round number stays in each entry's details)."""
        for entry in reversed(self.ledger.entries):
            details = dict(entry.details)
            if details.get("run_id") == run_id and "round" in details:
                return entry.round_index - int(details["round"]) + round_number
        last = max(self.ledger.rounds, default=0)
        return round_number if round_number >= last else last + round_number

    def local_dp_events(self, run_id: str) -> list[DpEvent]:
        """The DP-SGD steps this site took in ``run_id`` so far, in every process: a client restarted
        in the middle of a job composes them into its new accountant, so its budget checks and its
        reported ε cover the whole job. (Entries saved before the run was recorded with them cannot
        be attributed to a run; they still count in :meth:`sample_epsilon`.)"""
        return [e.event for e in self.ledger.entries
                if e.party == SITE_PARTY and dict(e.details).get("run_id") == run_id]

    # -- reading --------------------------------------------------------------------------------
    @property
    def unprotected_releases(self) -> list[Release]:
        return [r for r in self.releases if not r.protected]

    def sample_epsilon(self) -> float:
        return self.ledger.epsilon(SITE_PARTY)

    def lifetime_local_epsilon(self, extra: DpEvent | None = None) -> float:
        """The site's sample-level ε over every job in this state (its saved DP-SGD steps, RDP at its
        δ), with ``extra`` (a round about to train or to be released) composed in."""
        if extra is None:
            return self.sample_epsilon()
        return self._epsilon_with(SITE_PARTY, extra)

    def user_epsilon(self) -> float:
        """User-level ε as this site can guarantee it: ∞ once any release had no noise it can rely on."""
        if self.unprotected_releases:
            return math.inf
        return self.ledger.epsilon(FEDERATION)

    def user_epsilon_after(self, event: DpEvent | None) -> float:
        """:meth:`user_epsilon` if one more release with user-level noise ``event`` (None: none the site
        can rely on) were recorded: what ``max_user_epsilon`` caps, over every release in this state."""
        if event is None or self.unprotected_releases:
            return math.inf
        return self._epsilon_with(FEDERATION, event)

    def _epsilon_with(self, party: str, event: DpEvent) -> float:
        """``party``'s ε in the ledger with ``event`` composed in: the ledger's running accountant for
        the party, asked what if (no budget is set in a site's ledger, so nothing is refused)."""
        round_index = max(self.ledger.rounds, default=0)
        if party == FEDERATION:
            spend = self.ledger.check_budget(round_index, federation=event)
            assert spend.federation_epsilon is not None
            return spend.federation_epsilon
        return self.ledger.check_budget(round_index, clients={party: event}).client_epsilons[party]
