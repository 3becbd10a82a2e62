"""Privacy reports from a :class:`~fedveil.dp.ledger.PrivacyLedger`: text, JSON, Markdown and a plot.

Why: a privacy officer signs off on figures, so the report shows per round and cumulatively the
federation's user-level ε and each client's sample-level ε, the mechanism and its parameters, the
sampling each round's ε relies on (Poisson with rate q, K of N without replacement, or none) and the
neighbouring relation the ε holds under, and the budget remaining — the history behind the final number.

All functions are pure: :func:`build_report` takes a ledger object (from a JSON file or handed in by a
run-store reader), the renderers return strings / dicts, and :func:`render_plot` returns a matplotlib
``Figure`` built without pyplot (no global state) that the caller saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedveil.dp.accounting import (
    ADD_REMOVE,
    REPLACE_ONE,
    DpEvent,
    RdpCurveEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
)
from fedveil.dp.bounded import WorkBound
from fedveil.dp.ledger import FEDERATION, PartyRound, PrivacyLedger, unverified_reason


@dataclass(frozen=True)
class PartyRoundReport:
    """One party's figures for one round.

    A client's figures are computed from parameters the client *reported*; ``unverified`` says why the
    server could not confirm them (at this round or an earlier one), and then the figures are not shown
    as facts. ``accountant`` is the accountant that computed them (RDP's bound where the ledger's own
    would have exceeded the work bound, :mod:`fedveil.dp.bounded`)."""

    mechanism: str
    parameters: dict[str, Any]
    epsilon_round: float
    epsilon_cumulative: float
    budget_remaining: float | None
    sampling: str = "none"
    """The sampling this round's ε relies on: ``"Poisson q=…"``, ``"without replacement K of N"`` or ``"none"``."""
    relation: str = ADD_REMOVE
    """The neighbouring relation of ``epsilon_cumulative``."""
    accountant: str = ""
    unverified: str = ""

    @property
    def verified(self) -> bool:
        return not self.unverified


@dataclass(frozen=True)
class RoundReport:
    round_index: int
    federation: PartyRoundReport | None
    clients: dict[str, PartyRoundReport] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyReport:
    accountant: str
    federation_delta: float
    client_delta: float
    federation_budget: float | None
    client_budget: float | None
    rounds: list[RoundReport]
    federation_epsilon: float | None  # None: no user-level mechanism was recorded (no user-level bound)
    client_epsilons: dict[str, float]
    federation_relation: str | None = None  # the neighbouring relation of federation_epsilon
    client_unverified: dict[str, str] = field(default_factory=dict)
    """Clients whose final figure the server could not verify, and why."""


def sampling_text(event: DpEvent) -> str:
    """How the event's sampling amplifies it, in words: Poisson with rate q, K of N without replacement,
    or ``"none"`` (q = 1: everyone who could take part is accounted as taking part)."""
    if isinstance(event, SampledWithoutReplacementGaussianEvent):
        return f"without replacement {event.sample_size} of {event.population}"
    if isinstance(event, SubsampledGaussianEvent):
        q = event.sample_rate
    else:
        raw = dict(event.params).get("sample_rate", 1.0)
        q = float(raw) if isinstance(raw, (int, float)) else 1.0
    return "none" if q >= 1.0 else f"Poisson q={q:.4g}"


SITE_REPORTED = "computed from parameters reported by the site"
_LABELS = ("source", "verified", "unverified")



def _parameters(pr: PartyRound) -> dict[str, Any]:
    ev = pr.event
    params: dict[str, Any]
    if isinstance(ev, SubsampledGaussianEvent):
        params = {"sample_rate": ev.sample_rate, "noise_multiplier": ev.noise_multiplier, "steps": ev.steps}
    elif isinstance(ev, SampledWithoutReplacementGaussianEvent):
        params = {"population": ev.population, "sample_size": ev.sample_size,
                  "noise_multiplier": ev.noise_multiplier, "steps": ev.steps}
    else:
        assert isinstance(ev, RdpCurveEvent)
        params = {**dict(ev.params), "steps": ev.steps}
    params.update((k, v) for k, v in pr.details if k not in _LABELS)
    return params


def build_report(ledger: PrivacyLedger, bound: WorkBound | None = None) -> PrivacyReport:
    """Compute per-round and cumulative ε for the federation and every client of ``ledger``, within
    ``bound`` (a fresh :class:`~fedveil.dp.bounded.WorkBound` by default: a ledger with hostile entries
    cannot make a report compute for minutes)."""
    cfg = ledger.config
    bound = bound or WorkBound()
    by_round: dict[int, dict[str, PartyRoundReport]] = {}
    finals: dict[str, float] = {}
    unverified: dict[str, str] = {}
    for party in [FEDERATION, *ledger.clients]:
        budget = cfg.budget_for(party)
        reason = ""
        for pr in ledger.party_history(party, bound):
            reason = reason or unverified_reason(dict(pr.details))
            by_round.setdefault(pr.round_index, {})[party] = PartyRoundReport(
                mechanism=pr.mechanism,
                parameters=_parameters(pr),
                epsilon_round=pr.epsilon_round,
                epsilon_cumulative=pr.epsilon_cumulative,
                budget_remaining=None if budget is None else max(0.0, budget - pr.epsilon_cumulative),
                sampling=sampling_text(pr.event),
                relation=pr.relation,
                accountant=pr.accountant,
                unverified=reason,
            )
            finals[party] = pr.epsilon_cumulative
        if reason:
            unverified[party] = reason
    rounds = [
        RoundReport(
            round_index=r,
            federation=parts.get(FEDERATION),
            clients={p: v for p, v in sorted(parts.items()) if p != FEDERATION},
        )
        for r, parts in sorted(by_round.items())
    ]
    return PrivacyReport(
        accountant=cfg.accountant,
        federation_delta=cfg.federation_delta,
        client_delta=cfg.client_delta,
        federation_budget=cfg.federation_epsilon_budget,
        client_budget=cfg.client_epsilon_budget,
        rounds=rounds,
        federation_epsilon=finals.get(FEDERATION),
        client_epsilons={p: v for p, v in sorted(finals.items()) if p != FEDERATION},
        federation_relation=ledger.relation(FEDERATION) if FEDERATION in finals else None,
        client_unverified=dict(sorted(unverified.items())),
    )


def _num(x: float | None) -> float | None:
    """JSON has no infinity: an infinite ε (zero noise) is written as null."""
    return None if x is None or not math.isfinite(x) else x


def _party_dict(p: PartyRoundReport, client: bool) -> dict[str, Any]:
    shown = p.verified  # an unverified figure is not a fact: its number moves to a labelled key
    out: dict[str, Any] = {
        "mechanism": p.mechanism,
        "parameters": p.parameters,
        "epsilon_round": _num(p.epsilon_round) if shown else None,
        "epsilon_cumulative": _num(p.epsilon_cumulative) if shown else None,
        "budget_remaining": _num(p.budget_remaining) if shown else None,
        "sampling": p.sampling,
        "relation": p.relation,
        "accountant": p.accountant,
    }
    if client:
        out["source"] = SITE_REPORTED
        out["verified"] = p.verified
    if not shown:
        out["unverified"] = p.unverified
        out["epsilon_cumulative_from_reported_parameters"] = _num(p.epsilon_cumulative)
    return out


def report_to_dict(report: PrivacyReport) -> dict[str, Any]:
    """JSON-ready dict: configuration, final ε per party, and a ``rounds`` list."""
    return {
        "accountant": report.accountant,
        "federation_delta": report.federation_delta,
        "client_delta": report.client_delta,
        "federation_budget": report.federation_budget,
        "client_budget": report.client_budget,
        "federation_epsilon": None if report.federation_epsilon is None else _num(report.federation_epsilon),
        "user_level_mechanism": report.federation_epsilon is not None,
        "federation_relation": report.federation_relation,
        "client_epsilons_source": SITE_REPORTED,
        "client_epsilons": {
            k: None if k in report.client_unverified else _num(v) for k, v in report.client_epsilons.items()
        },
        "client_epsilons_unverified": report.client_unverified,
        "rounds": [
            {
                "round": r.round_index,
                "federation": None if r.federation is None else _party_dict(r.federation, False),
                "clients": {cid: _party_dict(p, True) for cid, p in r.clients.items()},
            }
            for r in report.rounds
        ],
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.4f}"


#: Parameters with a column of their own, or too long for one cell (the JSON report keeps them).
_NOT_IN_CELL = frozenset({"sampling", "relation", "amplification_reason"})


def _fmt_params(params: dict[str, Any]) -> str:
    short = {"sample_rate": "q", "noise_multiplier": "z", "steps": "T", "population": "N", "sample_size": "K"}
    parts = []
    for k, v in params.items():
        if k in _NOT_IN_CELL:
            continue
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
        parts.append(f"{short.get(k, k)}={shown}")
    return ", ".join(parts)


def _rows(report: PrivacyReport) -> list[tuple[str, str, str, str, str, str, str, str]]:
    rows = []
    for r in report.rounds:
        parties: list[tuple[str, PartyRoundReport]] = []
        if r.federation is not None:
            parties.append((FEDERATION, r.federation))
        parties.extend(r.clients.items())
        for name, p in parties:
            level = "user" if name == FEDERATION else "sample (reported)"
            bound = f" [{p.accountant.upper()} bound]" if p.accountant == "rdp" and report.accountant != "rdp" else ""
            figures = (_fmt(p.epsilon_round), _fmt(p.epsilon_cumulative), _fmt(p.budget_remaining)) if p.verified \
                else ("unverified", "unverified", "-")
            rows.append(
                (str(r.round_index), name, level, f"{p.mechanism} ({_fmt_params(p.parameters)}){bound}", p.sampling,
                 *figures)
            )
    return rows


_HEADERS = ("round", "party", "level", "mechanism", "sampling", "ε round", "ε cumulative", "budget left")
_RELATION_WORDS = {
    ADD_REMOVE: "add/remove one site",
    REPLACE_ONE: "replace one site (the number of sites available at each draw is public)",
}


def _summary_lines(report: PrivacyReport) -> list[str]:
    fb = "none" if report.federation_budget is None else f"{report.federation_budget:g}"
    cb = "none" if report.client_budget is None else f"{report.client_budget:g}"
    lines = [
        f"accountant: {report.accountant}",
        (
            f"federation (user level): ε = {_fmt(report.federation_epsilon)} at δ = {report.federation_delta:g}, "
            f"budget {fb}, neighbouring relation: "
            f"{_RELATION_WORDS.get(report.federation_relation or ADD_REMOVE, report.federation_relation)}"
            if report.federation_epsilon is not None
            else "federation (user level): no user-level mechanism recorded, so no user-level ε bound holds"
        ),
    ]
    for cid, eps in report.client_epsilons.items():
        reason = report.client_unverified.get(cid)
        shown = f"UNVERIFIED ({reason})" if reason else f"ε = {_fmt(eps)} at δ = {report.client_delta:g}, budget {cb}"
        lines.append(f"client {cid} (sample level): {shown}, {SITE_REPORTED}")
    return lines


def render_text(report: PrivacyReport) -> str:
    """Aligned plain-text table plus a summary."""
    rows = _rows(report)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(_HEADERS)]
    out = [*_summary_lines(report), ""]
    out.append("  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths, strict=True)).rstrip())
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        out.append("(no rounds recorded)")
    return "\n".join(out) + "\n"


def render_markdown(report: PrivacyReport) -> str:
    """A Markdown section: summary bullets and a table."""
    out = ["# Privacy report", ""]
    out.extend(f"- {line}" for line in _summary_lines(report))
    out.append("")
    out.append("| " + " | ".join(_HEADERS) + " |")
    out.append("|" + "|".join("---" for _ in _HEADERS) + "|")
    for row in _rows(report):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(out) + "\n"


_MAX_LEGEND_CLIENTS = 12


def render_plot(report: PrivacyReport, unbounded_note: str | None = None) -> Figure:
    """Cumulative ε against rounds: one line for the federation (user level) and one per client (sample
    level), with dashed budget lines. Returns the figure; the caller saves it (``fig.savefig(path)``).

    ``unbounded_note``: why the user-level ε is ∞ although the ledger's line is finite (a site's ledger
    holds its protected releases only); written below the axes, and the line is labelled as those only."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    fed_x = [r.round_index for r in report.rounds if r.federation is not None]
    fed_y = [r.federation.epsilon_cumulative for r in report.rounds if r.federation is not None]
    # An infinite ε (a round without noise) would simply vanish from a line plot: draw it at a
    # ceiling above every finite value and budget, marked and labelled as ε = ∞.
    values = fed_y + [r.clients[c].epsilon_cumulative for r in report.rounds for c in r.clients]
    any_infinite = not all(math.isfinite(v) for v in values)
    budgets = [b for b in (report.federation_budget, report.client_budget) if b is not None]
    finite = [v for v in [*values, *budgets] if math.isfinite(v)]
    ceiling = (max(finite) if finite else 1.0) * 1.15 or 1.0

    def clamped(ys: list[float]) -> list[float]:
        return [y if math.isfinite(y) else ceiling for y in ys]

    def mark_infinite(xs: list[int], ys: list[float], color: Any) -> None:
        inf_x = [x for x, y in zip(xs, ys, strict=True) if not math.isfinite(y)]
        if inf_x:
            ax.scatter(inf_x, [ceiling] * len(inf_x), marker="^", s=60, color=color, zorder=3)
            ax.annotate("ε = ∞", (inf_x[0], ceiling), textcoords="offset points", xytext=(4, 6), fontsize="small")

    if fed_x:
        ax.plot(
            fed_x,
            clamped(fed_y),
            marker="o",
            linewidth=2.5,
            color="black",
            label=f"federation (user, δ={report.federation_delta:g})"
            + (", protected releases only" if unbounded_note else ""),
        )
        mark_infinite(fed_x, fed_y, "black")
    many = len(report.client_epsilons) > _MAX_LEGEND_CLIENTS
    for i, cid in enumerate(report.client_epsilons):
        xs = [r.round_index for r in report.rounds if cid in r.clients]
        ys = [r.clients[cid].epsilon_cumulative for r in report.rounds if cid in r.clients]
        if many:
            label = f"clients ({len(report.client_epsilons)}, sample, δ={report.client_delta:g})" if i == 0 else None
        else:
            label = f"client {cid} (sample, reported, δ={report.client_delta:g})"
            if cid in report.client_unverified:
                label += ", UNVERIFIED"
            if not all(math.isfinite(y) for y in ys):
                label += ", ε = ∞"
        line = ax.plot(xs, clamped(ys), marker=".", linewidth=1.2, label=label)
        mark_infinite(xs, ys, line[0].get_color())
    if report.federation_budget is not None and fed_x:
        ax.axhline(report.federation_budget, color="black", linestyle="--", linewidth=1, label="federation budget")
    if report.client_budget is not None and report.client_epsilons:
        ax.axhline(report.client_budget, color="grey", linestyle=":", linewidth=1, label="client budget")
    ax.set_ylim(bottom=0.0, top=ceiling * 1.1 if any_infinite else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.set_title(f"Privacy spent ({report.accountant.upper()} accountant)")

    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    if unbounded_note:  # below the axes, where it covers no line
        import textwrap

        note = textwrap.fill(f"user-level ε = ∞: {unbounded_note}", width=110)
        fig.subplots_adjust(bottom=0.2 + 0.045 * note.count("\n"))
        fig.text(0.01, 0.015, note, color="darkred", fontsize="small", va="bottom")
    return fig
