"""``fedveil demo healthcare``: the scripted demo, end to end.

1. Split WDBC (:mod:`fedveil.demo.data`) and write each hospital's share into its own data
   directory, ``OUT/hospitals/<hospital>/demo-share.csv``.
2. Run the federation (:mod:`fedveil.demo.federation`): the real coordinator and one client per
   hospital, secure aggregation over TLS gRPC on loopback (or in-process), local DP-SGD per
   hospital, some hospitals dropping out of some rounds. A progress bar and a live table show
   each round: test accuracy, ROC AUC and loss of the new global model, each hospital's
   patient-level ε, the user-level ε when a user-level mechanism is on, and who dropped.
3. Compare with (a) centralized non-private training and (b) federated non-private training on
   the same split with the same rounds and dropouts (:mod:`fedveil.demo.baselines`).
4. Write ``report.json``, ``report.md``, ``report.html`` and the plots to ``OUT``.

With a dashboard port the web dashboard (:mod:`fedveil.server.dashboard`) serves the demo's run
live, lets the browser start further runs (which train on a hospital's uploaded ``site.csv``
when it has one, else on its demo share), and keeps serving after the demo until Ctrl+C.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from fedveil.demo import healthcare
from fedveil.demo.baselines import centralized, federated_non_private
from fedveil.demo.data import DEMO_SPLIT_SEED, DemoSplit, make_split
from fedveil.demo.federation import (
    DpMode,
    DropoutPlan,
    FederationResult,
    FederationSettings,
    RoundReport,
    Transport,
    run_federation,
    user_level_noise_ratio,
)
from fedveil.demo.live_table import LiveTable
from fedveil.demo.recipe import Recipe
from fedveil.demo.report import unwritable_outputs, write_report
from fedveil.demo.split_runs import DEMO_SHARE, hospital_dir, write_hospital_shares
from fedveil.errors import FedveilError

if TYPE_CHECKING:
    from fedveil.server.dashboard_auth import LoginToken

log = logging.getLogger("fedveil.demo")


class OutputDirectoryError(FedveilError, ValueError):
    """``--out`` cannot take the demo's files (checked before any work, so nothing is lost)."""


STORE_FILE = "runs.sqlite"


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings: the CLI flags, with the tuned recipe's defaults."""

    hospitals: int = 5
    rounds: int | None = None
    dropout: float = 0.1
    dp: DpMode = "local"
    in_process: bool = False
    dashboard_port: int | None = None
    out: Path = Path("demo-out")
    seed: int = 0
    dashboard_token: LoginToken | None = field(default=None, repr=False)
    """The dashboard's login token (``--dashboard-token-file``); None: a fresh one."""

    @property
    def recipe(self) -> Recipe:
        base = Recipe()
        return dataclasses.replace(base, rounds=self.rounds) if self.rounds is not None else base


def export_csv(split: DemoSplit, directory: Path) -> dict[str, Any]:
    """Write ``<hospital>.csv`` per hospital and ``SCHEMA.md`` describing the columns."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for site in split.hospitals:
        path = directory / f"{site.name}.csv"
        path.write_text(healthcare.SCHEMA.to_csv(site.features, site.labels))
        written.append({"hospital": site.name, "path": str(path), "rows": site.size,
                        "malignant_share": round(site.malignant_share, 4)})
    (directory / "SCHEMA.md").write_text(schema_markdown())
    return {"directory": str(directory), "files": written, "schema": str(directory / "SCHEMA.md")}


def schema_markdown() -> str:
    s = healthcare.SCHEMA
    lines = [
        "# Site CSV schema: fedveil.demo.healthcare:task",
        "",
        "One header row naming the columns (in any order; the export puts the label last), then one",
        "row per patient. UTF-8 text, comma-separated, numbers only. Features are raw measurements of",
        "the cell nuclei in a fine-needle aspirate image (WDBC), never negative; the model scales them",
        f"itself. At most {s.max_rows} rows; the dashboard accepts files up to 2 MiB.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    for c in [*s.features, s.label]:
        lines.append(f"| `{c.name}` | {c.dtype} | {c.description} |")
    lines += ["", "Try a file with `fedveil client --task fedveil.demo.healthcare:task --data FILE ...` or",
              "upload it on the dashboard's Hospitals page.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Runs (the demo's own, and the ones the dashboard starts)


class DemoRuns:
    """Runs the federation for the demo and for the dashboard, recording them for the dashboard."""

    def __init__(self, options: DemoOptions, split: DemoSplit, runs: Any, console: Console) -> None:
        self.options = options
        self.split = split
        self.runs = runs  # a fedveil.server.dashboard.MemoryRunSource
        self.console = console
        self.test = TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._active = 0  # runs in progress (the demo's own and the browser's): one at a time
        self._count_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.split.hospitals]

    def site_files(self, prefer_uploads: bool) -> dict[str, Path]:
        files = {}
        for name in self.names:
            d = hospital_dir(self.options.out, name)
            upload = d / "site.csv"
            files[name] = upload if prefer_uploads and upload.is_file() else d / DEMO_SHARE
        return files

    def run(
        self, settings: FederationSettings, recipe: Recipe, *, prefer_uploads: bool,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> FederationResult:
        with self._count_lock:
            self._active += 1
        try:
            return self._run(settings, recipe, prefer_uploads=prefer_uploads, on_round=on_round)
        finally:
            with self._count_lock:
                self._active -= 1

    def _run(
        self, settings: FederationSettings, recipe: Recipe, *, prefer_uploads: bool,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> FederationResult:
        rid_box: list[str] = []
        max_silent = settings.hospitals_per_round - settings.threshold
        plan = DropoutPlan.draw(self.names, settings.rounds, settings.dropout, max_silent, settings.seed)

        warning = user_level_warning(settings, recipe, len(self.names))

        def started(run_id: str) -> None:
            rid_box.append(run_id)
            self.runs.begin_run(
                {"rounds": settings.rounds, "sites_per_round": settings.hospitals_per_round, "dp": settings.dp,
                 "epsilon_budget": settings.epsilon_budget if settings.dp != "none" else None,
                 "dropout": settings.dropout, "transport": settings.transport, "warning": warning},
                self.names, epsilon_budget=settings.epsilon_budget if settings.dp != "none" else None,
                delta=recipe.delta, run_id=run_id)

        def observed(report: RoundReport, model: torch.nn.Module) -> None:
            if rid_box:
                self.runs.add_round(rid_box[0], report.to_dict())
            self.runs.set_model(model.state_dict())  # the served model: the mean of the last rounds' models
            if on_round is not None:
                on_round(report)

        try:
            result = run_federation(
                store_path=self.options.out / STORE_FILE, site_files=self.site_files(prefer_uploads), test=self.test,
                settings=settings, recipe=recipe, dropout_plan=plan, on_round=observed, on_start=started)
        except Exception:
            if rid_box:  # the dashboard shows runs to the browser: no exception text there
                self.runs.finish_run(rid_box[0], error="the run failed with an internal error (see the demo's log)")
            raise
        error, message = _public_outcome(result)
        self.runs.finish_run(result.run_id, error=error, summary={"status": result.status, "message": message})
        return result

    # -- the dashboard's RunStarter interface --
    def busy(self) -> bool:
        return self._active > 0 or (self._thread is not None and self._thread.is_alive())

    def start(self, browser_settings: Any) -> str:
        with self._lock:
            if self.busy():
                from fedveil.server.dashboard import DashboardError

                raise DashboardError("a run is already in progress; wait for it to finish")
            settings = FederationSettings(
                rounds=browser_settings.rounds, hospitals_per_round=max(2, browser_settings.sites_per_round),
                dp=browser_settings.dp, epsilon_budget=browser_settings.epsilon_budget, dropout=self.options.dropout,
                transport="in-process" if self.options.in_process else "grpc",
                seed=int(time.time()) % 100_000,
            )
            recipe = dataclasses.replace(self.options.recipe, rounds=settings.rounds,
                                         target_epsilon=settings.epsilon_budget)
            ready = threading.Event()
            box: dict[str, Any] = {}

            def on_start_wrapper() -> None:
                try:
                    self.run(settings, recipe, prefer_uploads=True)
                except Exception:
                    box["error"] = "internal error (see the demo's log)"
                    log.exception("dashboard run failed")
                finally:
                    ready.set()

            before = {r["id"] for r in self.runs.list_runs()}
            self._thread = threading.Thread(target=on_start_wrapper, name="dashboard-run", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                new = [r["id"] for r in self.runs.list_runs() if r["id"] not in before]
                if new:
                    return str(new[0])
                if ready.is_set():
                    break
                time.sleep(0.05)
            from fedveil.server.dashboard import DashboardError

            raise DashboardError(f"the run did not start: {box.get('error', 'timed out')}")


def _public_outcome(result: FederationResult) -> tuple[str | None, str]:
    """(the run's error, its summary message) as the dashboard may show them: hospitals' failures
    by name, their exception text only in the demo's log."""
    if not result.client_errors:
        return (result.message if result.status != "completed" else None), result.message
    for name, err in sorted(result.client_errors.items()):
        log.error("run %s: hospital %s: %s", result.run_id, name, err)
    names = ", ".join(sorted(result.client_errors))
    if result.status == "completed":
        return f"client errors at {names} (see the demo's log)", result.message
    message = f"{result.status}: hospitals {names} failed (see the demo's log)"
    return message, message


# ---------------------------------------------------------------------------------------------
# The demo


def run_demo(
    options: DemoOptions,
    console: Console | None = None,
    *,
    serve_forever: bool = True,
    on_dashboard: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demo; returns the report (also written to ``options.out``)."""
    from fedveil.server.dashboard import Dashboard, DashboardServer, MemoryRunSource, SiteDataDirs

    console = console or Console()
    torch.set_num_threads(1)
    logging.getLogger("fedveil").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    started = time.monotonic()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    from fedveil.server.store import RunStore

    RunStore(out / STORE_FILE).close()  # refuse an unusable store (StoreError) before any work
    blocked = unwritable_outputs(out)
    hospitals_root = out / "hospitals"
    if hospitals_root.exists() and not hospitals_root.is_dir():
        blocked.append("hospitals")
    if blocked:
        raise OutputDirectoryError(
            f"{str(out)!r} already has {', '.join(blocked)} of the wrong kind (a directory where the demo writes a "
            "file, or a file where it needs a directory); choose another --out or move it")
    recipe = options.recipe
    split = make_split(options.hospitals, seed=DEMO_SPLIT_SEED)
    write_hospital_shares(split, out)
    runs = MemoryRunSource(out / STORE_FILE)
    demo_runs = DemoRuns(options, split, runs, console)
    server: DashboardServer | None = None
    if options.dashboard_port is not None:
        dirs = SiteDataDirs(out / "hospitals", tuple(demo_runs.names), healthcare.task)
        app = Dashboard(task=healthcare.task, runs=runs, sites=dirs, starter=demo_runs,
                        examples=healthcare.example_patients(split),
                        title="fedveil healthcare demo")
        server = DashboardServer(app, port=options.dashboard_port, token=options.dashboard_token).start()
        # printed once, on the console only: the login URL carries the token
        console.print(f"[bold]dashboard[/] {server.login_url}", highlight=False, soft_wrap=True)
        if on_dashboard is not None:
            on_dashboard(server.login_url)

    try:
        console.print(
            f"[bold]fedveil healthcare demo[/]: WDBC, {options.hospitals} hospitals "
            + ", ".join(f"{h.name} ({h.size} patients, {100 * h.malignant_share:.0f}% malignant)"
                        for h in split.hospitals)
            + f"; test set {split.test.size}, validation {split.validation.size}", highlight=False)
        transport: Transport = "in-process" if options.in_process else "grpc"
        settings = FederationSettings(
            rounds=recipe.rounds, hospitals_per_round=options.hospitals, dp=options.dp,
            epsilon_budget=recipe.target_epsilon, dropout=options.dropout, transport=transport, seed=options.seed,
        )
        console.print(
            f"secure aggregation over {'TLS gRPC on 127.0.0.1' if transport == 'grpc' else 'in-process calls'}; "
            f"DP mode [bold]{options.dp}[/]; {recipe.rounds} rounds; dropout probability {options.dropout:g}",
            highlight=False)
        warning = user_level_warning(settings, recipe, len(split.hospitals))
        if warning is not None:
            console.print(f"[bold yellow]warning[/]: {warning}", highlight=False)
        live = LiveTable(console, demo_runs.names, recipe.rounds, options.dp)
        with live:
            result = demo_runs.run(settings, recipe, prefer_uploads=False, on_round=live.add)
        if not result.rounds:
            raise RuntimeError(f"the federation completed no rounds: {result.message} {result.client_errors}")

        central, _ = centralized(split, recipe)
        # the private run's cohorts: whoever did not take part in a round stays silent in the baseline's
        federated, _ = federated_non_private(
            split, recipe, seed=options.seed, dropout_plan=DropoutPlan.replay(result.rounds, demo_runs.names),
            site_files=demo_runs.site_files(prefer_uploads=False))
        baselines = {"centralized": central.to_dict(), "federated_non_private": federated.to_dict()}
        report = build_report(options, recipe, split, result, warning, baselines)
        report["wall_seconds"] = round(time.monotonic() - started, 2)
        paths = write_report(report, out)
        report["files"] = {k: str(v) for k, v in paths.items()}
        print_comparison(console, report)
        if server is not None and serve_forever:
            url = server.url
            server.serve_until_signalled(lambda: console.print(
                f"dashboard still serving at {url} (log in with the URL printed above); press Ctrl+C to stop",
                highlight=False))
        return report
    finally:
        if server is not None:
            server.stop()


def user_level_warning(settings: FederationSettings, recipe: Recipe, n_hospitals: int) -> str | None:
    """The warning for a user-level DP run whose noise outweighs every update (None otherwise)."""
    ratio = user_level_noise_ratio(settings, recipe, n_hospitals)
    if ratio is None or ratio <= 1.0:
        return None
    return (f"user-level DP over {settings.hospitals_per_round} hospitals: each round's noise has {ratio:.1f}x "
            "the norm of the largest possible mean update, so the model is dominated by noise and varies widely "
            "from run to run. User-level DP needs hundreds of participants per round; with a few hospitals, "
            "--dp local protects each patient at the same ε and keeps a useful model.")


def build_report(
    options: DemoOptions, recipe: Recipe, split: DemoSplit, result: FederationResult, warning: str | None,
    baselines: Mapping[str, Any],
) -> dict[str, Any]:
    served = result.served
    if served is None:
        raise ValueError("build_report: the run released no global model")
    last = result.rounds[-1]
    hospitals = []
    for site in split.hospitals:
        h = result.hospitals.get(site.name, {})
        hospitals.append({"name": site.name, "patients": site.size, "malignant_share": site.malignant_share,
                          "noise_multiplier": h.get("noise_multiplier"), "rounds_joined": h.get("rounds_joined", 0),
                          "epsilon": h.get("epsilon")})
    eps_local = [h["epsilon"] for h in hospitals if h["epsilon"] is not None]
    user_level = options.dp in ("central", "distributed")
    eps_user = result.epsilon_user if user_level else None
    if options.dp == "local":
        eps_sample_max: float | None = max(eps_local) if eps_local else None
    elif user_level:
        eps_sample_max = eps_user  # user-level DP covers every patient of a hospital with the same ε
    else:
        eps_sample_max = None
    notes = [
        "Accuracy, ROC AUC and loss are measured on the held-out test set, which no choice of the recipe looked at; "
        "the recipe was tuned by cross-validation on the non-test patients (fedveil.demo.tuning).",
        f"The served model is the {served.description} (the recipe's average_last = {recipe.average_last}): "
        "averaging released models is post-processing and costs no privacy. Each round's figures are that "
        "round's global model's.",
        "Federated non-private baseline: the same hospitals, rounds, dropouts, seed, local and server optimizers "
        "without DP-SGD, run through the same job runner and secure aggregation (in process).",
    ]
    if user_level:
        notes.append("No local DP-SGD in this mode: epsilon_sample_max reports the user-level ε, which bounds every "
                     "patient's privacy too (a patient's records belong to one hospital).")
        if warning is not None:
            notes.append(warning)
    if result.status != "completed":
        notes.append(f"The federation ended early: {result.status}: {result.message}")
    if result.client_errors:
        notes.append("Client errors: " + "; ".join(f"{k}: {v}" for k, v in result.client_errors.items()))
    return {
        "final_accuracy": served.accuracy,
        "final_auc": served.auc,
        "final_loss": served.loss,
        "served_model": {"description": served.description, "rounds": served.rounds},
        "last_round": {"round": last.round, "accuracy": last.accuracy, "auc": last.auc, "loss": last.loss},
        "epsilon_sample_max": eps_sample_max,
        "epsilon_user": eps_user,
        "delta": recipe.delta,
        "dp": options.dp,
        "transport": "in-process" if options.in_process else "grpc+tls",
        "run_id": result.run_id,
        "status": result.status,
        "rounds": [r.to_dict() for r in result.rounds],
        "hospitals": hospitals,
        "baselines": dict(baselines),
        "recipe": recipe.to_dict(),
        "settings": {"hospitals": options.hospitals, "rounds": recipe.rounds, "dropout": options.dropout,
                     "dp": options.dp, "epsilon_budget": recipe.target_epsilon if options.dp != "none" else None,
                     "seed": options.seed, "split_seed": DEMO_SPLIT_SEED},
        "split": {"test": split.test.size, "validation": split.validation.size,
                  "hospitals": {h.name: h.size for h in split.hospitals}},
        "secure_aggregation": {"graph": "complete", "threshold": FederationSettings(1, options.hospitals).threshold,
                               "dropouts": sum(len(r.dropped) for r in result.rounds)},
        "notes": notes,
    }


def print_comparison(console: Console, report: Mapping[str, Any]) -> None:
    from fedveil.demo.report import comparison_rows

    t = Table(title="privacy-utility comparison (held-out test set)", header_style="bold")
    for col in ("model", "privacy", "accuracy", "ROC AUC", "loss"):
        t.add_column(col, justify="left" if col in ("model", "privacy") else "right")
    for row in comparison_rows(report):
        loss = row.get("loss")
        t.add_row(row["name"], row["privacy"], f"{row['accuracy']:.3f}", f"{row['auc']:.3f}",
                  "–" if loss is None or (isinstance(loss, float) and math.isnan(loss)) else f"{loss:.3f}")
    console.print(t)
    served, last = report.get("served_model"), report.get("last_round")
    if served and last:
        console.print(f"the private federation serves the {served['description']}; the last round's model alone: "
                      f"accuracy {last['accuracy']:.3f}, ROC AUC {last['auc']:.3f}", highlight=False)
    files = report.get("files", {})
    if files:
        console.print(f"report: {files.get('markdown')} · {files.get('html')} · {files.get('json')}", highlight=False)
