"""The demo's privacy–utility curve: the federation at several patient-level ε, over several splits.

One run of the demo is one point, and a 113-patient test set is a noisy judge (its AUC moves by about
±0.01 from one stratified draw to the next). ``fedveil demo healthcare --sweep`` runs the real
federation (:func:`fedveil.demo.federation.run_federation`: the coordinator, secure aggregation and
every hospital's own DP-SGD, in process) at each patient-level ε target, on each of several split
seeds, plus the same federation without DP; the centralized non-private model (one site holding all
training data) is the other reference. Each point is the mean over the splits with one standard
deviation as its error bar, drawn against ε with the two baselines as lines (Abadi et al. 2016 and
McMahan et al. 2018 show curves of this kind).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedveil.demo.baselines import centralized
from fedveil.demo.data import DEMO_SPLIT_SEED, make_split
from fedveil.demo.federation import FederationSettings, run_federation
from fedveil.demo.recipe import Recipe
from fedveil.demo.report import render_html
from fedveil.demo.split_runs import write_hospital_shares

DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
DEFAULT_SPLITS = 3
MAX_EPSILON = 1e4


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` → the ε targets (each finite and > 0, distinct); a ValueError names the bad value."""
    values: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number") from None
        if not (math.isfinite(value) and 0 < value <= MAX_EPSILON):
            raise ValueError(f"{part.strip()} is not an ε target in (0, {MAX_EPSILON:g}]")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError("an ε target is given twice")
    return tuple(sorted(values))


@dataclass(frozen=True)
class SweepOptions:
    out: Path
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    splits: int = DEFAULT_SPLITS
    hospitals: int = 5
    rounds: int | None = None
    recipe: Recipe = dataclasses.field(default_factory=Recipe)

    def __post_init__(self) -> None:
        if not self.epsilons:
            raise ValueError("epsilons: give at least one ε target")
        if not 1 <= self.splits <= 20:
            raise ValueError(f"splits: must be between 1 and 20 (got {self.splits})")


@dataclass(frozen=True)
class SweepPoint:
    """One federation: its ε target (None: no DP), split seed and final test metrics."""

    epsilon: float | None
    split_seed: int
    accuracy: float
    auc: float
    epsilon_spent: float | None
    seconds: float


def run_sweep(options: SweepOptions, on_point: Callable[[SweepPoint], None] | None = None) -> dict[str, Any]:
    """Every (ε, split) federation and the baselines; writes sweep.json, sweep.png and report.md/html."""
    started = time.monotonic()
    recipe = options.recipe if options.rounds is None else dataclasses.replace(options.recipe, rounds=options.rounds)
    points: list[SweepPoint] = []
    central: list[tuple[float, float]] = []
    for index in range(options.splits):
        split_seed = DEMO_SPLIT_SEED + index
        split = make_split(options.hospitals, seed=split_seed)
        folder = options.out / f"split-{split_seed}"
        files = write_hospital_shares(split, folder)
        test = TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
        baseline, _ = centralized(split, recipe)
        central.append((baseline.accuracy, baseline.auc))
        for epsilon in (None, *options.epsilons):
            t0 = time.monotonic()
            settings = FederationSettings(
                rounds=recipe.rounds, hospitals_per_round=options.hospitals, dp="none" if epsilon is None else "local",
                epsilon_budget=epsilon or recipe.target_epsilon, transport="in-process", seed=index)
            run_recipe = recipe if epsilon is None else dataclasses.replace(recipe, target_epsilon=epsilon)
            label = "none" if epsilon is None else f"{epsilon:g}"
            result = run_federation(store_path=folder / f"run-eps-{label}.db", site_files=files, test=test,
                                    settings=settings, recipe=run_recipe)
            if not result.rounds or result.served is None:
                raise RuntimeError(f"split {split_seed}, ε {label}: the federation completed no rounds "
                                   f"({result.message})")
            served = result.served
            point = SweepPoint(epsilon, split_seed, served.accuracy, served.auc, result.rounds[-1].epsilon_sample_max,
                               time.monotonic() - t0)
            points.append(point)
            if on_point is not None:
                on_point(point)
    summary = summarize(points, central)
    summary.update(epsilons=list(options.epsilons), splits=options.splits, hospitals=options.hospitals,
                   rounds=recipe.rounds, delta=recipe.delta, wall_seconds=round(time.monotonic() - started, 1),
                   points=[dataclasses.asdict(p) for p in points])
    write_sweep(summary, options.out)
    return summary


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(points: Sequence[SweepPoint], central: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Per ε (and without DP): mean and standard deviation of accuracy and AUC over the splits."""
    rows = []
    for epsilon in sorted({p.epsilon for p in points if p.epsilon is not None}):
        chosen = [p for p in points if p.epsilon == epsilon]
        rows.append(_row(epsilon, chosen))
    non_private = [p for p in points if p.epsilon is None]
    acc, acc_sd = _mean_sd([a for a, _ in central])
    auc, auc_sd = _mean_sd([u for _, u in central])
    return {"curve": rows, "federated_non_private": _row(None, non_private) if non_private else None,
            "centralized": {"accuracy": acc, "accuracy_sd": acc_sd, "auc": auc, "auc_sd": auc_sd,
                            "runs": len(central)}}


def _row(epsilon: float | None, chosen: Sequence[SweepPoint]) -> dict[str, Any]:
    acc, acc_sd = _mean_sd([p.accuracy for p in chosen])
    auc, auc_sd = _mean_sd([p.auc for p in chosen])
    spent = [p.epsilon_spent for p in chosen if p.epsilon_spent is not None]
    return {"epsilon": epsilon, "accuracy": acc, "accuracy_sd": acc_sd, "auc": auc, "auc_sd": auc_sd,
            "runs": len(chosen), "epsilon_spent_max": max(spent) if spent else None}


def write_sweep(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """sweep.json, the curve as sweep.png, and report.md/report.html holding the sweep's section."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "png": out / "sweep.png", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_curve(summary, paths["png"])
    markdown = sweep_markdown(summary, paths["png"].name)
    paths["md"].write_text(markdown, encoding="utf-8")
    paths["html"].write_text(render_html(markdown, title="fedveil healthcare demo: privacy–utility curve"),
                             encoding="utf-8")
    return paths


def plot_curve(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["curve"]
    eps = [r["epsilon"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "auc", "ROC AUC")):
        ax.errorbar(eps, [r[metric] for r in rows], yerr=[r[f"{metric}_sd"] for r in rows], marker="o", capsize=4,
                    label=f"federated, local DP-SGD (mean ± sd over {summary['splits']} splits)")
        for ref, style, label in ((summary["centralized"], "--", "centralized, non-private"),
                                  (summary["federated_non_private"], ":", "federated, non-private")):
            if ref is not None:
                ax.axhline(ref[metric], linestyle=style, color="grey" if style == "--" else "black", label=label)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.set_xlabel(f"patient-level ε (δ = {summary['delta']:g})")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"healthcare demo: {summary['hospitals']} hospitals, {summary['rounds']} rounds")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_markdown(summary: dict[str, Any], png_name: str) -> str:
    def cell(row: dict[str, Any], metric: str) -> str:
        return f"{row[metric]:.3f} ± {row[f'{metric}_sd']:.3f}"

    lines = ["# Privacy–utility curve", "",
             f"{summary['hospitals']} hospitals, {summary['rounds']} rounds, secure aggregation with each hospital's "
             f"own DP-SGD at each patient-level ε (δ = {summary['delta']:g}); mean ± one standard deviation over "
             f"{summary['splits']} split seed(s) of the WDBC data. Sweep wall time: {summary['wall_seconds']:.0f} s.",
             "", f"![privacy–utility curve]({png_name})", "",
             "| patient-level ε | accuracy | ROC AUC | runs |", "|---|---|---|---|"]
    for row in summary["curve"]:
        lines.append(f"| {row['epsilon']:g} | {cell(row, 'accuracy')} | {cell(row, 'auc')} | {row['runs']} |")
    if summary["federated_non_private"] is not None:
        row = summary["federated_non_private"]
        lines.append(f"| ∞ (federated, no DP) | {cell(row, 'accuracy')} | {cell(row, 'auc')} | {row['runs']} |")
    row = summary["centralized"]
    lines.append(f"| ∞ (centralized, no DP) | {cell(row, 'accuracy')} | {cell(row, 'auc')} | {row['runs']} |")
    return "\n".join(lines) + "\n"
