"""The demo's live view in the terminal: a progress bar and a per-round table (rich), refreshed as
rounds complete; one plain line per round when the output is not a terminal."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedveil.demo.federation import RoundReport


class LiveTable:
    """A progress bar and a per-round table (rich), refreshed as rounds complete."""

    def __init__(self, console: Console, hospitals: list[str], rounds: int, dp: str) -> None:
        self.console = console
        self.hospitals = hospitals
        self.dp = dp
        self.progress = Progress(TextColumn("[bold]federated training"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.task_id = self.progress.add_task("rounds", total=rounds)
        self.rows: list[RoundReport] = []
        self._live: Live | None = None

    def table(self) -> Table:
        t = Table(title="rounds (test set: held-out patients)", header_style="bold", show_lines=False)
        t.add_column("round", justify="right")
        t.add_column("accuracy", justify="right")
        t.add_column("ROC AUC", justify="right")
        t.add_column("loss", justify="right")
        for h in self.hospitals:
            t.add_column(f"ε {h.replace('hospital-', 'H')}", justify="right")
        t.add_column("user ε", justify="right")
        t.add_column("dropped")
        t.add_column("s", justify="right")
        for r in self.rows[-25:]:
            eps = [f"{v:.2f}" if (v := r.epsilon_sample.get(h)) is not None else "–" for h in self.hospitals]
            t.add_row(str(r.round), f"{r.accuracy:.3f}", f"{r.auc:.3f}", f"{r.loss:.3f}", *eps,
                      f"{r.epsilon_user:.2f}" if r.epsilon_user is not None else "–",
                      ", ".join(d.replace("hospital-", "H") for d in r.dropped) or "–", f"{r.seconds:.1f}")
        return t

    def __enter__(self) -> LiveTable:
        if self.console.is_terminal:
            self._live = Live(Group(self.progress, self.table()), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def add(self, report: RoundReport) -> None:
        self.rows.append(report)
        self.progress.update(self.task_id, completed=len(self.rows))
        if self._live is not None:
            self._live.update(Group(self.progress, self.table()))
        else:
            eps = " ".join(f"{h}={report.epsilon_sample[h]:.2f}" for h in self.hospitals
                           if report.epsilon_sample.get(h) is not None)
            user = f" user-ε={report.epsilon_user:.2f}" if report.epsilon_user is not None else ""
            self.console.print(
                f"round {report.round:>3}  acc {report.accuracy:.3f}  auc {report.auc:.3f}  loss {report.loss:.3f}"
                + (f"  ε[{eps}]" if eps else "") + f"{user}  dropped: {', '.join(report.dropped) or '-'}",
                highlight=False, markup=False)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
