"""ε per party and round for the dashboard's run view: computed once per ledger version, bounded.

The run view used to rebuild every party's ε history on every request, with the ledger's own
accountant: under ``--dp-accountant pld`` a site's claimed ``steps = 1e8`` kept it computing for
minutes. :class:`LedgerViews` computes a run's figures once per ledger version (cache keyed by the
SHA-256 of the ledger JSON) within a :class:`~fedveil.dp.bounded.WorkBound` (RDP's bound stands in
where the ledger's accountant would exceed it, and the figure says so), and it keeps the bound's memo
across versions, so a new round costs the new round's computations only.

A site's sample-level figure is the server's own computation from parameters the site reported. It
is *verified* at a round only if every report of the site up to that round was (the ledger entry's
``verified`` detail, set by :mod:`fedveil.server.reports`; entries from older servers carry none and
are judged by their noise multiplier alone).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.bounded import WorkBound
from fedveil.dp.ledger import FEDERATION, PartyRound, PrivacyLedger, unverified_reason
from fedveil.server.reports import PLAUSIBLE_MAX_NOISE_MULTIPLIER


@dataclass(frozen=True)
class PartyFigure:
    """One party's cumulative ε after one round."""

    epsilon: float
    verified: bool
    reason: str
    """Why it is not verified ("" when it is)."""
    accountant: str
    """The accountant that computed ``epsilon`` (``"rdp"`` where the ledger's was over the work bound)."""


@dataclass(frozen=True)
class SpentEpsilon:
    """The ε a run has spent: the federation's user-level figure, or under local DP the largest
    site's sample-level one, as the sites reported their DP-SGD (the server cannot see it)."""

    epsilon: float
    delta: float
    user_level: bool


def spent_epsilon(ledger: PrivacyLedger, round_number: int | None = None) -> SpentEpsilon | None:
    """The ε spent up to and including ``round_number`` (None: every recorded round); None when the
    ledger holds no entry (no DP). Shared by the exported model's metadata and the metrics."""
    parties = {e.party for e in ledger.entries}
    if not parties:
        return None

    def spent(party: str) -> float:
        if round_number is None:
            return ledger.epsilon(party)
        history = [h for h in ledger.party_history(party) if h.round_index <= round_number]
        return history[-1].epsilon_cumulative if history else 0.0

    if FEDERATION in parties:
        return SpentEpsilon(spent(FEDERATION), ledger.config.delta_for(FEDERATION), user_level=True)
    sites = sorted(parties)
    return SpentEpsilon(max(spent(site) for site in sites), max(ledger.config.delta_for(site) for site in sites),
                        user_level=False)


def _unverified_reason(pr: PartyRound) -> str:
    details = dict(pr.details)
    if reason := unverified_reason(details):
        return reason
    ev = pr.event
    if "verified" not in details and isinstance(ev, SubsampledGaussianEvent) \
            and ev.noise_multiplier > PLAUSIBLE_MAX_NOISE_MULTIPLIER:
        return f"noise multiplier {ev.noise_multiplier:g} is far above what DP-SGD runs use"
    return ""


def party_figures(ledger: PrivacyLedger, bound: WorkBound) -> dict[str, dict[int, PartyFigure]]:
    """Every party's figures by round (the federation's are the server's own mechanism: verified)."""
    out: dict[str, dict[int, PartyFigure]] = {}
    for party in [FEDERATION, *ledger.clients]:
        figures: dict[int, PartyFigure] = {}
        reason = ""
        for pr in ledger.party_history(party, bound):
            if party != FEDERATION and not reason:
                reason = _unverified_reason(pr)
            figures[pr.round_index] = PartyFigure(pr.epsilon_cumulative, not reason, reason, pr.accountant)
        if figures:
            out[party] = figures
    return out


class LedgerViews:
    """The latest figures of each run, recomputed only when its ledger JSON changes. Thread-safe."""

    def __init__(self, bound: WorkBound | None = None) -> None:
        self.bound = bound or WorkBound()
        self.computations = 0
        """Ledger versions computed so far (a cache hit adds nothing)."""
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, dict[str, dict[int, PartyFigure]]]] = {}

    def figures(self, run_id: str, ledger_json: str | None) -> dict[str, dict[int, PartyFigure]]:
        if not ledger_json:
            return {}
        digest = hashlib.sha256(ledger_json.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(run_id)
            if cached is not None and cached[0] == digest:
                return cached[1]
            self.bound.start()
            figures = party_figures(PrivacyLedger.from_json(ledger_json), self.bound)
            self.computations += 1
            self._cache[run_id] = (digest, figures)
            return figures
