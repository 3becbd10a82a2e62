"""The privacy ledger: every round's mechanism and parameters, for the federation and for each client.

Two levels of privacy are tracked side by side:

- **user level** (party ``"federation"``): what the released aggregates reveal about any one client's
  participation — DP-FedAvg central noise (McMahan et al. 2018, one Gaussian event per round, with the
  cohort sampling that really happened: see :func:`fedveil.dp.sampling.user_level_event`) or
  distributed noise inside the secure sum (an :class:`~fedveil.dp.accounting.RdpCurveEvent`);
- **sample level** (party = client id): what one client's DP-SGD training reveals about any one of its
  records (Abadi et al. 2016, q = batch ÷ local dataset, steps = local steps over all rounds it joined).

Why a ledger and not just an accountant: privacy officers need the per-round history behind the
number, and the coordinator must refuse to *start* a round that would overspend the budget.
:meth:`PrivacyLedger.reserve` checks the budget for every party first and records the round only if all
fit; otherwise it raises :class:`BudgetExceededError` saying what would be spent and what is left.
Reserving before the work is conservative: a round that aborts before releasing anything can be taken
back with :meth:`PrivacyLedger.cancel_round` (the federation's entry; clients' local spend stays).

Serializable to and from JSON (``to_json`` / ``from_json``); a malformed document raises
:class:`LedgerFormatError` naming the field. Pure: no I/O (callers persist the JSON, e.g. in SQLite).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fedveil.dp.accounting import (
    ACCOUNTANTS,
    ADD_REMOVE,
    DP_EVENT_TYPES,
    DpEvent,
    PrivacyAccountant,
    RdpCurveEvent,
    UnsupportedEventError,
    check_delta,
    make_accountant,
)
from fedveil.dp.bounded import WorkBound, bounded_epsilon
from fedveil.dp.ledger_entry import FEDERATION, LedgerEntry, entry_from_dict, parties, unverified_reason
from fedveil.errors import FedveilError

__all__ = ["FEDERATION", "LedgerEntry", "parties", "unverified_reason"]  # re-exported: the ledger's vocabulary
LEDGER_FORMAT: Final[str] = "fedveil.privacy_ledger"
LEDGER_VERSION: Final[int] = 1
#: Relative slack when comparing ε with the budget, so that floating-point noise in composing the same
#: rounds in a different order never flips a decision that is exact in real arithmetic.
BUDGET_REL_TOLERANCE: Final[float] = 1e-9


class LedgerFormatError(FedveilError, ValueError):
    """A ledger document (JSON) is malformed; the message names the field at fault."""


class BudgetExceededError(FedveilError, RuntimeError):
    """Starting this round would take ``party`` over its ε budget.

    Attributes give the figures: ``epsilon_before`` (spent so far), ``epsilon_after`` (spent if the round
    ran), ``budget``, ``remaining`` (budget − spent so far) and ``delta`` at which ε is measured.
    """

    def __init__(
        self, *, party: str, round_index: int, epsilon_before: float, epsilon_after: float, budget: float, delta: float
    ) -> None:
        self.party = party
        self.round_index = round_index
        self.epsilon_before = epsilon_before
        self.epsilon_after = epsilon_after
        self.budget = budget
        self.delta = delta
        level = "user-level" if party == FEDERATION else "sample-level"
        who = "federation" if party == FEDERATION else f"client {party!r}"
        super().__init__(
            f"{who}: round {round_index} would raise {level} ε from {epsilon_before:.6g} to {epsilon_after:.6g} "
            f"(δ={delta:g}), over the budget ε={budget:g}; would spend {self.would_spend:.6g}, "
            f"{self.remaining:.6g} left"
        )

    @property
    def would_spend(self) -> float:
        return self.epsilon_after - self.epsilon_before

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon_before)


@dataclass(frozen=True)
class LedgerConfig:
    """Which accountant, the δ for each level, and the optional ε budgets (``None`` = unlimited)."""

    accountant: str = "rdp"
    federation_delta: float = 1e-5
    client_delta: float = 1e-5
    federation_epsilon_budget: float | None = None
    client_epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")
        check_delta(self.federation_delta, "federation_delta")
        check_delta(self.client_delta, "client_delta")
        for name in ("federation_epsilon_budget", "client_epsilon_budget"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0 or None (got {value!r})")

    def delta_for(self, party: str) -> float:
        return self.federation_delta if party == FEDERATION else self.client_delta

    def budget_for(self, party: str) -> float | None:
        return self.federation_epsilon_budget if party == FEDERATION else self.client_epsilon_budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "federation_delta": self.federation_delta,
            "client_delta": self.client_delta,
            "federation_epsilon_budget": self.federation_epsilon_budget,
            "client_epsilon_budget": self.client_epsilon_budget,
        }


@dataclass(frozen=True)
class PartyRound:
    """ε of one party in one round: that round alone and cumulative up to and including it."""

    round_index: int
    mechanism: str
    event: DpEvent
    epsilon_round: float
    epsilon_cumulative: float
    details: tuple[tuple[str, Any], ...] = ()
    relation: str = ADD_REMOVE
    """The neighbouring relation ``epsilon_cumulative`` holds under (``"add_remove"`` / ``"replace_one"``)."""
    accountant: str = ""
    """The accountant that computed the ε figures: the ledger's, or ``"rdp"`` where the ledger's
    would have exceeded the caller's work bound (:mod:`fedveil.dp.bounded`)."""


@dataclass(frozen=True)
class RoundSpend:
    """What :meth:`PrivacyLedger.reserve` recorded: cumulative ε per party after the round."""

    round_index: int
    federation_epsilon: float | None
    client_epsilons: dict[str, float]


class PrivacyLedger:
    """Per-round record of DP mechanisms with cumulative accounting and a budget stop."""

    def __init__(self, config: LedgerConfig | None = None) -> None:
        self.config = config or LedgerConfig()
        self._entries: list[LedgerEntry] = []
        self._accountants: dict[str, PrivacyAccountant] = {}
        self._last_round: dict[str, int] = {}
        # Every party's accountant comes from this prototype, so RDP curves of identical mechanisms are
        # computed once per ledger, not once per client and round.
        self._prototype = make_accountant(self.config.accountant)

    # -- reading ------------------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def clients(self) -> list[str]:
        return sorted({e.party for e in self._entries if e.party != FEDERATION})

    @property
    def rounds(self) -> list[int]:
        return sorted({e.round_index for e in self._entries})

    def epsilon(self, party: str = FEDERATION) -> float:
        """Cumulative ε of ``party`` (user level for ``"federation"``, sample level for a client id)."""
        acc = self._accountants.get(party)
        return 0.0 if acc is None else acc.get_epsilon(self.config.delta_for(party))

    def relation(self, party: str = FEDERATION) -> str:
        """The neighbouring relation :meth:`epsilon` holds under for ``party`` (``"add_remove"`` unless a
        fixed-size cohort was accounted with sampling amplification: ``"replace_one"``)."""
        acc = self._accountants.get(party)
        return ADD_REMOVE if acc is None else acc.relation

    def remaining(self, party: str = FEDERATION) -> float | None:
        """Budget left for ``party`` (``None`` when no budget is configured)."""
        budget = self.config.budget_for(party)
        return None if budget is None else max(0.0, budget - self.epsilon(party))

    def party_history(self, party: str, bound: WorkBound | None = None) -> list[PartyRound]:
        """Per-round and cumulative ε for ``party``, in round order (one item per round it took part in).

        With ``bound`` (:class:`~fedveil.dp.bounded.WorkBound`), numerical accountants run only within
        its limits and RDP's bound stands in elsewhere (``PartyRound.accountant`` says which): a view
        of a ledger whose entries came from a site's reports must not compute for minutes."""
        delta = self.config.delta_for(party)
        by_round: dict[int, list[LedgerEntry]] = {}
        for e in self._entries:
            if e.party == party:
                by_round.setdefault(e.round_index, []).append(e)
        running = self._prototype.fresh()
        events: list[DpEvent] = []
        out: list[PartyRound] = []
        for r in sorted(by_round):
            items = by_round[r]
            events.extend(e.event for e in items)
            if bound is None:
                alone = self._prototype.fresh()
                for e in items:
                    alone.compose(e.event)
                    running.compose(e.event)
                eps_round, eps_total, used = alone.get_epsilon(delta), running.get_epsilon(delta), self._prototype.name
            else:
                eps_round, used_round = bounded_epsilon(self._prototype, [e.event for e in items], delta, bound)
                eps_total, used = bounded_epsilon(self._prototype, events, delta, bound)
                used = used if used == used_round else "rdp"
            details: dict[str, Any] = {}
            for e in items:
                details.update(dict(e.details))
            out.append(
                PartyRound(
                    round_index=r,
                    mechanism=" + ".join(dict.fromkeys(e.mechanism for e in items)),
                    event=items[-1].event,
                    epsilon_round=eps_round,
                    epsilon_cumulative=eps_total,
                    details=tuple(sorted(details.items())),
                    relation=running.relation,
                    accountant=used,
                )
            )
        return out

    # -- budget -------------------------------------------------------------------------------------
    def check_budget(
        self,
        round_index: int,
        *,
        federation: DpEvent | None = None,
        clients: Mapping[str, DpEvent] | None = None,
    ) -> RoundSpend:
        """Projected cumulative ε per party if this round ran; raises :class:`BudgetExceededError` for the
        first party (federation first, then clients by id) that would go over its budget, and
        ``UnsupportedEventError`` if the configured accountant cannot account an event."""
        planned = self._planned(round_index, federation, clients)
        projected: dict[str, float] = {}
        for party, event in planned:
            acc = self._accountants.get(party) or self._prototype
            acc._check_supported(event)  # UnsupportedEventError with the accountant's own message
            delta = self.config.delta_for(party)
            after = acc.epsilon_after([event], delta)
            budget = self.config.budget_for(party)
            if budget is not None and after > budget * (1.0 + BUDGET_REL_TOLERANCE):
                raise BudgetExceededError(
                    party=party,
                    round_index=round_index,
                    epsilon_before=acc.get_epsilon(delta) if party in self._accountants else 0.0,
                    epsilon_after=after,
                    budget=budget,
                    delta=delta,
                )
            projected[party] = after
        return RoundSpend(
            round_index=round_index,
            federation_epsilon=projected.get(FEDERATION),
            client_epsilons={p: v for p, v in projected.items() if p != FEDERATION},
        )

    def reserve(
        self,
        round_index: int,
        *,
        federation: DpEvent | None = None,
        clients: Mapping[str, DpEvent] | None = None,
        mechanism: str | None = None,
        client_mechanism: str = "dp-sgd",
        details: Mapping[str, Any] | None = None,
    ) -> RoundSpend:
        """Check the budget for every party and, only if all fit, record the round (all or nothing)."""
        spend = self.check_budget(round_index, federation=federation, clients=clients)
        self.record(
            round_index,
            federation=federation,
            clients=clients,
            mechanism=mechanism,
            client_mechanism=client_mechanism,
            details=details,
        )
        return spend

    # -- writing ------------------------------------------------------------------------------------
    def record(
        self,
        round_index: int,
        *,
        federation: DpEvent | None = None,
        clients: Mapping[str, DpEvent] | None = None,
        mechanism: str | None = None,
        client_mechanism: str = "dp-sgd",
        details: Mapping[str, Any] | None = None,
        client_details: Mapping[str, Any] | None = None,
    ) -> None:
        """Record what a round did, without a budget check (e.g. sample-level spend reported afterwards).

        ``mechanism`` labels the federation event (default: ``"gaussian"`` for a subsampled Gaussian, else
        the RDP-curve event's mechanism name); ``details`` (e.g. clip norm, cohort size) go with it, and
        ``client_details`` with each client event (e.g. that the parameters were reported by the site,
        and whether the server could verify them).
        """
        planned = self._planned(round_index, federation, clients)
        for name, extra_details in (("details", details), ("client_details", client_details)):
            try:
                json.dumps(dict(extra_details or {}), allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} must be JSON-serializable with finite numbers ({err})") from None
        for party, event in planned:  # validate all before mutating anything
            (self._accountants.get(party) or self._prototype)._check_supported(event)
        for party, event in planned:
            if party == FEDERATION:
                label = mechanism or _default_label(event)
                extra = tuple(sorted((details or {}).items()))
            else:
                label = client_mechanism
                extra = tuple(sorted((client_details or {}).items()))
            self._append(LedgerEntry(round_index, party, label, event, extra))

    def keep_round(self, round_index: int) -> None:
        """Mark the federation's latest entry for ``round_index`` as a release: an attempt that ended after
        the sites' masked inputs were in (and, at a stop, after their unmasking shares left) counts, and
        no later :meth:`cancel_round` of the same round (a retry that aborted early, a restart) takes it
        back. Without it both did, and the server's ε undercounted (review of 2026-12-07)."""
        for index in range(len(self._entries) - 1, -1, -1):
            entry = self._entries[index]
            if entry.round_index == round_index and entry.party == FEDERATION:
                if not _released(entry):
                    self._entries[index] = dataclasses.replace(entry, details=(*entry.details, (RELEASED, True)))
                return

    def cancel_round(self, round_index: int, *, include_clients: bool = False) -> int:
        """Take back the reservation for ``round_index`` of the attempt that aborted before the server
        released anything: each party's latest entry for that round, never one :meth:`keep_round` marked.
        Sample-level client entries stay unless ``include_clients``: their local training already happened.
        Only a party's latest round can be cancelled. Returns the number of entries removed."""
        latest: dict[str, LedgerEntry] = {}
        for e in self._entries:
            if e.round_index == round_index and (include_clients or e.party == FEDERATION):
                latest[e.party] = e
        hit = [e for e in latest.values() if not _released(e)]
        for e in hit:
            if self._last_round.get(e.party, -1) != round_index:
                raise ValueError(f"round {round_index} is not the latest round of party {e.party!r}")
        drop = {id(e) for e in hit}
        kept = [e for e in self._entries if id(e) not in drop]
        self._entries, self._accountants, self._last_round = [], {}, {}  # prototype (cache) kept
        for e in kept:
            self._append(e)
        return len(hit)

    def _append(self, entry: LedgerEntry) -> None:
        acc = self._accountants.get(entry.party)
        if acc is None:
            acc = self._prototype.fresh()
            self._accountants[entry.party] = acc
        acc.compose(entry.event)
        self._entries.append(entry)
        self._last_round[entry.party] = entry.round_index

    def _planned(
        self, round_index: int, federation: DpEvent | None, clients: Mapping[str, DpEvent] | None
    ) -> list[tuple[str, DpEvent]]:
        if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
            raise ValueError(f"round_index must be an integer >= 0 (got {round_index!r})")
        planned: list[tuple[str, DpEvent]] = []
        if federation is not None:
            planned.append((FEDERATION, federation))
        for cid in sorted(clients or {}):
            if not isinstance(cid, str) or not cid or cid == FEDERATION:
                raise ValueError(f"client id must be a non-empty string other than {FEDERATION!r} (got {cid!r})")
            planned.append((cid, (clients or {})[cid]))
        if not planned:
            raise ValueError("a round needs a federation event or at least one client event")
        for party, event in planned:
            if not isinstance(event, DP_EVENT_TYPES):
                raise UnsupportedEventError(f"{party}: not a DP event ({type(event).__name__})")
            last = self._last_round.get(party)
            if last is not None and round_index < last:
                raise ValueError(f"{party}: round {round_index} comes before its last recorded round {last}")
        return planned

    def copy(self) -> PrivacyLedger:
        """An independent copy with the same entries. It shares the accountant prototype, whose caches
        (RDP curves per mechanism) are pure memos, so copying costs no curve computation."""
        other = PrivacyLedger(self.config)
        other._prototype = self._prototype
        for e in self._entries:
            other._append(e)
        return other

    # -- serialization ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "config": self.config.to_dict(),
            "entries": [e.to_dict() for e in self._entries],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> PrivacyLedger:
        if not isinstance(data, Mapping):
            raise LedgerFormatError(f"ledger must be a JSON object (got {type(data).__name__})")
        if data.get("format") != LEDGER_FORMAT:
            raise LedgerFormatError(f"format: expected {LEDGER_FORMAT!r} (got {data.get('format')!r})")
        if data.get("version") != LEDGER_VERSION:
            raise LedgerFormatError(f"version: unsupported ledger version {data.get('version')!r}")
        cfg = data.get("config")
        if not isinstance(cfg, Mapping):
            raise LedgerFormatError("config: missing or not an object")
        try:
            config = LedgerConfig(**{k: cfg[k] for k in LedgerConfig().to_dict() if k in cfg})
        except (TypeError, ValueError) as err:
            raise LedgerFormatError(f"config: {err}") from None
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise LedgerFormatError("entries: missing or not a list")
        ledger = cls(config)
        for i, item in enumerate(entries):
            try:
                entry = entry_from_dict(item)
                last = ledger._last_round.get(entry.party)
                if last is not None and entry.round_index < last:
                    raise ValueError(f"round {entry.round_index} comes before round {last} of party {entry.party!r}")
                ledger._append(entry)
            except (ValueError, TypeError, KeyError) as err:
                raise LedgerFormatError(f"entries[{i}]: {err}") from None
        return ledger

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        return cls.from_dict(data)


def _default_label(event: DpEvent) -> str:
    return event.mechanism if isinstance(event, RdpCurveEvent) else "gaussian"


RELEASED = "released"
"""The detail :meth:`PrivacyLedger.keep_round` adds to an attempt's entry that counts as a release."""


def _released(entry: LedgerEntry) -> bool:
    return any(key == RELEASED and value for key, value in entry.details)
