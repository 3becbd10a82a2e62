"""One entry of the privacy ledger (:mod:`fedveil.dp.ledger`): a mechanism applied to one party in one
round, its JSON form, and the helpers that read entries (who the parties are, whether a site's
reported spend was verified)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fedveil.dp.accounting import DpEvent, event_from_dict

FEDERATION: Final[str] = "federation"
"""The party of user-level entries (what the released aggregates reveal about one site)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism application recorded for one party in one round."""

    round_index: int
    party: str
    mechanism: str
    event: DpEvent
    details: tuple[tuple[str, Any], ...] = ()

    @property
    def level(self) -> str:
        return "user" if self.party == FEDERATION else "sample"

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round_index,
            "party": self.party,
            "level": self.level,
            "mechanism": self.mechanism,
            "event": self.event.to_dict(),
            "details": dict(self.details),
        }



def entry_from_dict(item: Any) -> LedgerEntry:
    if not isinstance(item, Mapping):
        raise ValueError(f"entry must be an object (got {type(item).__name__})")
    for key in ("round", "party", "mechanism", "event"):
        if key not in item:
            raise ValueError(f"missing field {key!r}")
    r = item["round"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"round must be an integer >= 0 (got {r!r})")
    party, mech = item["party"], item["mechanism"]
    if not isinstance(party, str) or not party:
        raise ValueError(f"party must be a non-empty string (got {party!r})")
    if not isinstance(mech, str):
        raise ValueError(f"mechanism must be a string (got {mech!r})")
    details = item.get("details", {})
    if not isinstance(details, Mapping):
        raise ValueError("details must be an object")
    try:
        event = event_from_dict(item["event"])
    except ValueError as err:
        raise ValueError(f"event: {err}") from None
    return LedgerEntry(r, party, mech, event, tuple(sorted(details.items())))


def unverified_reason(details: Mapping[str, Any]) -> str:
    """Why a client entry is unverified ("" when its details do not say so). A server that records a
    site's *reported* spend labels the entry with its verdict (``fedveil.server.reports``)."""
    if details.get("verified") is False:
        return str(details.get("unverified") or "not verified by the server")
    return ""


def parties(entries: Iterable[LedgerEntry]) -> list[str]:
    """Distinct parties in ``entries``: the federation first, then clients by id."""
    seen = {e.party for e in entries}
    return ([FEDERATION] if FEDERATION in seen else []) + sorted(seen - {FEDERATION})
