"""The demo's outputs: ``report.json``, ``report.md``, ``report.html`` and the plots.

``report.json`` always holds at least ``final_accuracy``, ``final_auc`` (the served model's: the
mean of the last rounds' global models, described in ``served_model``), ``epsilon_sample_max``
(the worst hospital's patient-level ε), ``epsilon_user`` (null without a user-level mechanism),
``delta`` and ``rounds`` (one entry per round); the Markdown and HTML reports show the same
figures with three plots: accuracy/ROC AUC against rounds, ε against rounds, and the
privacy-utility comparison with the baselines.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTS = {
    "utility": "accuracy_auc_by_round.png",
    "epsilon": "epsilon_by_round.png",
    "comparison": "privacy_utility.png",
}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: Mapping[str, Any], out: Path) -> Path:
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(dict(report)), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def render_plots(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Draw the three plots as PNG files in ``out`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    baselines = report.get("baselines", {})
    paths: dict[str, Path] = {}

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, [r["accuracy"] for r in rounds], marker="o", ms=3, label="accuracy (private federation)")
    ax.plot(xs, [r["auc"] for r in rounds], marker="s", ms=3, label="ROC AUC (private federation)")
    served_rounds = report.get("served_model", {}).get("rounds") or []
    if served_rounds and xs:  # the served model (mean of the last rounds' models), drawn at the last round
        ax.plot([xs[-1]], [report["final_accuracy"]], marker="*", ms=11, color="tab:blue", ls="none",
                label=f"accuracy, served model (mean of rounds {served_rounds[0]}–{served_rounds[-1]})")
        ax.plot([xs[-1]], [report["final_auc"]], marker="*", ms=11, color="tab:orange", ls="none",
                label="ROC AUC, served model")
    styles = {"centralized": ":", "federated_non_private": "--"}
    for key, style in styles.items():
        b = baselines.get(key)
        if b:
            ax.axhline(b["accuracy"], color="tab:blue", ls=style, lw=1, label=f"accuracy, {b['name']}")
            ax.axhline(b["auc"], color="tab:orange", ls=style, lw=1, label=f"AUC, {b['name']}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out test metric")
    low = min([r["accuracy"] for r in rounds if r["accuracy"] is not None] + [0.8, report["final_accuracy"]])
    ax.set_ylim(max(0.0, low - 0.05), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Test accuracy and ROC AUC by round")
    fig.tight_layout()
    paths["utility"] = out / PLOTS["utility"]
    fig.savefig(paths["utility"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    hospitals = [h["name"] for h in report.get("hospitals", [])]
    for name in hospitals:
        ys = [(r.get("epsilon_sample") or {}).get(name) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", ms=3, label=f"{name} (patient level)")
    if any(r.get("epsilon_user") is not None for r in rounds):
        ax.plot(xs, [math.nan if r.get("epsilon_user") is None else r["epsilon_user"] for r in rounds],
                color="black", ls="--", label="federation (user level)")
    budget = report.get("settings", {}).get("epsilon_budget")
    if budget:
        ax.axhline(budget, color="tab:red", ls=":", label=f"budget ε = {budget:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"ε (δ = {report['delta']:g})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no differential privacy in this run", ha="center", transform=ax.transAxes)
    ax.set_title("Privacy spent by round")
    fig.tight_layout()
    paths["epsilon"] = out / PLOTS["epsilon"]
    fig.savefig(paths["epsilon"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    rows = _comparison_rows(report)
    labels = [f"{r['name']}\n{r['privacy']}" for r in rows]
    idx = list(range(len(rows)))
    width = 0.38
    ax.bar([i - width / 2 for i in idx], [r["accuracy"] for r in rows], width, label="accuracy")
    ax.bar([i + width / 2 for i in idx], [r["auc"] for r in rows], width, label="ROC AUC")
    for i, r in enumerate(rows):
        ax.text(i - width / 2, r["accuracy"] + 0.002, f"{r['accuracy']:.3f}", ha="center", fontsize=7)
        ax.text(i + width / 2, r["auc"] + 0.002, f"{r['auc']:.3f}", ha="center", fontsize=7)
    ax.set_xticks(idx, labels, fontsize=7)
    values = [r["accuracy"] for r in rows] + [r["auc"] for r in rows]
    ax.set_ylim(max(0.0, min(values) - 0.05), 1.01)
    ax.set_ylabel("held-out test metric")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Privacy-utility comparison")
    fig.tight_layout()
    paths["comparison"] = out / PLOTS["comparison"]
    fig.savefig(paths["comparison"])
    plt.close(fig)
    return paths


def _comparison_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baselines = report.get("baselines", {})
    for key in ("centralized", "federated_non_private"):
        b = baselines.get(key)
        if b:
            rows.append({"name": b["name"], "privacy": "no privacy", "accuracy": b["accuracy"], "auc": b["auc"],
                         "loss": b["loss"]})
    eps = report.get("epsilon_sample_max")
    privacy = "no DP" if report.get("dp") == "none" else f"patient ε ≤ {eps:.3f}" if eps is not None else "DP"
    if report.get("epsilon_user") is not None:
        privacy += f", user ε = {report['epsilon_user']:.3f}"
    dp = report.get("dp", "?")
    name = "federated, secure aggregation only" if dp == "none" else f"federated, {dp} DP"
    rows.append({"name": name, "privacy": privacy,
                 "accuracy": report["final_accuracy"], "auc": report["final_auc"], "loss": report.get("final_loss")})
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    served = report.get("served_model", {}).get("description", "the last round's global model")
    last = report.get("last_round", {})
    lines = [
        "# fedveil healthcare demo report",
        "",
        f"WDBC breast-cancer data, {len(report['hospitals'])} hospitals, {s['rounds']} rounds, "
        f"DP mode `{report['dp']}`, transport `{report['transport']}`, dropout probability {s['dropout']:g}, "
        f"training seed {s['seed']}, split seed {s.get('split_seed', '?')}.",
        "",
        "## Result",
        "",
        "| | value |",
        "|---|---|",
        f"| served model | {served} |",
        f"| test accuracy | {_fmt(report['final_accuracy'])} |",
        f"| test ROC AUC | {_fmt(report['final_auc'])} |",
        f"| last round's model alone: accuracy, ROC AUC | {_fmt(last.get('accuracy'))}, {_fmt(last.get('auc'))} |",
        f"| worst hospital's patient-level ε | {_fmt(report['epsilon_sample_max'], 3)} |",
        f"| user-level ε | {_fmt(report['epsilon_user'], 3)} |",
        f"| δ | {report['delta']:g} |",
        f"| wall time | {_fmt(report.get('wall_seconds'), 1)} s |",
        "",
        "## Privacy-utility comparison (held-out test set)",
        "",
        "| model | privacy | accuracy | ROC AUC | loss |",
        "|---|---|---|---|---|",
    ]
    for row in _comparison_rows(report):
        lines.append(f"| {row['name']} | {row['privacy']} | {_fmt(row['accuracy'])} | {_fmt(row['auc'])} | "
                     f"{_fmt(row['loss'])} |")
    lines += ["", f"One run is one point: one privacy setting, one split, {report['split']['test']} test patients. "
              "`fedveil demo healthcare --sweep` trains at several patient-level ε targets over several split "
              "seeds and draws the privacy–utility curve (accuracy and ROC AUC with error bars, against both "
              "non-private baselines).",
              "", f"![accuracy and AUC by round]({PLOTS['utility']})", "",
              f"![epsilon by round]({PLOTS['epsilon']})", "", f"![privacy-utility comparison]({PLOTS['comparison']})",
              "", "## Hospitals", "",
              "| hospital | patients | malignant share | noise multiplier | rounds joined | patient-level ε |",
              "|---|---|---|---|---|---|"]
    for h in report["hospitals"]:
        lines.append(f"| {h['name']} | {h['patients']} | {_fmt(h['malignant_share'], 2)} | "
                     f"{_fmt(h.get('noise_multiplier'), 2)} | {h['rounds_joined']} | {_fmt(h.get('epsilon'), 2)} |")
    lines += ["", "## Rounds", "",
              "| round | accuracy | ROC AUC | loss | max patient ε | user ε | participants | dropped |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {_fmt(r['accuracy'])} | {_fmt(r['auc'])} | {_fmt(r['loss'])} | "
                     f"{_fmt(r['epsilon_sample_max'], 2)} | {_fmt(r['epsilon_user'], 2)} | "
                     f"{', '.join(r['participants'])} | {', '.join(r['dropped']) or '–'} |")
    lines += ["", "## Recipe", "", "```json", json.dumps(report.get("recipe", {}), indent=2), "```", ""]
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def render_html(markdown_text: str, title: str = "fedveil healthcare demo report") -> str:
    """A self-contained HTML rendering of the Markdown report (tables, images, lists, code)."""
    out: list[str] = []
    in_table = in_code = in_list = False
    for line in markdown_text.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, _, rest = line[2:].partition("](")
            out.append(f'<p><img src="{html.escape(rest.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    style = ("body{font:14px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#0f172a}"
             "table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left}"
             "img{max-width:100%}pre{background:#f1f5f9;padding:1em;overflow:auto}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


REPORT_FILES: tuple[str, ...] = ("report.json", "report.md", "report.html", *PLOTS.values())


def unwritable_outputs(out: Path) -> list[str]:
    """The report files in ``out`` that something other than a file is in the way of (checked before a run)."""
    return [name for name in REPORT_FILES if (out / name).exists() and not (out / name).is_file()]


def write_report(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write report.json, the plots, report.md and report.html into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(report, out)}
    paths.update(render_plots(report, out))
    md = render_markdown(_clean(dict(report)))
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(render_html(md))
    paths["markdown"] = out / "report.md"
    paths["html"] = out / "report.html"
    return paths


def comparison_rows(report: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The privacy-utility rows (baselines, then the private federation) as plain dicts."""
    return _comparison_rows(report)
