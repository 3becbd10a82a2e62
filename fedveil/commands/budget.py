"""``fedveil budget``: privacy accounting from the command line.

- ``compute``: ε of T steps of the Poisson-subsampled Gaussian mechanism (q, z) at δ.
- ``noise``: the noise multiplier that meets a target ε (within 0.5 %, never above it).
- ``report``: per-round and cumulative ε of a privacy ledger (text, JSON, Markdown, PNG plot).

Bad arguments print one line ``error: --flag: ...`` and exit with status 2.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedveil.commands.common import eprint, fail, file_key, finite_or_none, print_json_last_line
from fedveil.dp.ledger import LedgerFormatError, PrivacyLedger

if TYPE_CHECKING:
    from fedveil.clients.privacy import CapHeadroom
    from fedveil.clients.site_state import SiteState

_SQLITE_MAGIC = b"SQLite format 3\x00"
_FORMATS = ("text", "json", "markdown")


def _check_common(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    from fedveil.dp.accounting import ACCOUNTANTS

    if not math.isfinite(sample_rate) or not 0.0 < sample_rate <= 1.0:
        fail("--sample-rate", f"must be in (0, 1] (got {sample_rate:g})")
    if steps < 1:
        fail("--steps", f"must be an integer >= 1 (got {steps})")
    if not math.isfinite(delta) or not 0.0 < delta < 1.0:
        fail("--delta", f"must be in (0, 1) (got {delta:g})")
    if accountant not in ACCOUNTANTS:
        fail("--accountant", f"must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")


_accountant_option = click.option(
    "--accountant",
    default="rdp",
    metavar="rdp|prv|pld",
    show_default=True,
    help="rdp (Opacus RDP), prv (Opacus PRV) or pld (Google dp-accounting PLD).",
)


@click.group(name="budget")
def budget() -> None:
    """Differential-privacy accounting: compute ε, solve for noise, report a ledger."""


@budget.command(name="compute")
@click.option("--sample-rate", "sample_rate", type=float, required=True, help="Poisson sampling rate q in (0, 1].")
@click.option("--noise-multiplier", "noise_multiplier", type=float, required=True, help="Noise std ÷ sensitivity.")
@click.option("--steps", type=int, required=True, help="Number of compositions (steps or rounds), >= 1.")
@click.option("--delta", type=float, required=True, help="Target δ in (0, 1).")
@_accountant_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def compute_cmd(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str, as_json: bool
) -> None:
    """Print ε for STEPS compositions of the Poisson-subsampled Gaussian mechanism."""
    _check_common(sample_rate, steps, delta, accountant)
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0.0:
        fail("--noise-multiplier", f"must be a finite number >= 0 (got {noise_multiplier:g})")
    if noise_multiplier == 0.0:
        fail("--noise-multiplier", "must be > 0 (got 0): without noise there is no privacy (ε = ∞)")
    from fedveil.dp.accounting import PRVAccountant, RDPAccountant, SubsampledGaussianEvent, make_accountant

    acc = make_accountant(accountant)
    payload: dict[str, object] = {
        "accountant": accountant,
        "delta": delta,
        "sample_rate": sample_rate,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
    }
    try:
        acc.compose(SubsampledGaussianEvent(sample_rate, noise_multiplier, steps))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's RDP "optimal order at the edge" hints
            if isinstance(acc, RDPAccountant):
                eps, order = acc.get_privacy_spent(delta)
                payload["optimal_order"] = order
            else:
                eps = acc.get_epsilon(delta)
    except (ValueError, RuntimeError, MemoryError, OverflowError) as err:
        fail("--accountant", f"the {accountant} accountant cannot evaluate this composition: {err}")
    if isinstance(acc, PRVAccountant):
        payload["epsilon_error"] = acc.eps_error
    payload["epsilon"] = eps
    click.echo(
        f"epsilon = {eps:.6g} at delta = {delta:g} ({accountant}; q = {sample_rate:g}, "
        f"noise multiplier = {noise_multiplier:g}, steps = {steps})"
    )
    if as_json:
        print_json_last_line(payload)


@budget.command(name="noise")
@click.option("--target-epsilon", "target_epsilon", type=float, required=True, help="Target ε > 0.")
@click.option("--sample-rate", "sample_rate", type=float, required=True, help="Poisson sampling rate q in (0, 1].")
@click.option("--steps", type=int, required=True, help="Number of compositions (steps or rounds), >= 1.")
@click.option("--delta", type=float, required=True, help="Target δ in (0, 1).")
@_accountant_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def noise_cmd(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str, as_json: bool
) -> None:
    """Print the noise multiplier whose ε is within 0.5 % of (and not above) TARGET_EPSILON."""
    if not math.isfinite(target_epsilon) or target_epsilon <= 0.0:
        fail("--target-epsilon", f"must be a finite number > 0 (got {target_epsilon:g})")
    _check_common(sample_rate, steps, delta, accountant)
    from fedveil.dp.calibration import solve_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's RDP "optimal order at the edge" hints
            sol = solve_noise_multiplier(
                target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
            )
    except (ValueError, RuntimeError, MemoryError) as err:
        fail("--target-epsilon", str(err))
    click.echo(
        f"noise multiplier = {sol.noise_multiplier:.6g} gives epsilon = {sol.epsilon:.6g} "
        f"(target {target_epsilon:g}) at delta = {delta:g} ({accountant}; q = {sample_rate:g}, steps = {steps})"
    )
    if as_json:
        print_json_last_line(
            {
                "noise_multiplier": sol.noise_multiplier,
                "epsilon": sol.epsilon,
                "target_epsilon": target_epsilon,
                "delta": delta,
                "accountant": accountant,
                "sample_rate": sample_rate,
                "steps": steps,
            }
        )


@budget.command(name="report")
@click.argument("ledger_path", metavar="LEDGER", type=str)
@click.option("--format", "fmt", default="text", show_default=True, metavar="text|json|markdown", help="Output format.")
@click.option(
    "--plot", "plot_path", type=str, default=None, metavar="FILE.png", help="Write a PNG of ε against rounds."
)
@click.option(
    "--run", "run_id", type=str, default=None, metavar="RUN_ID", help="Run id in a run store (default: the latest run)."
)
@click.option(
    "--policy", "policy_path", type=str, default=None, metavar="POLICY.toml",
    help="With a site's state file: the site's policy file (fedveil client --policy); shows what its caps over "
         "every job still allow.",
)
def report_cmd(ledger_path: str, fmt: str, plot_path: str | None, run_id: str | None,
               policy_path: str | None) -> None:
    """Per-round and cumulative ε of a privacy ledger (JSON file), of a run in a run store (SQLite) —
    the federation (user level) and each client (sample level) — or of a site's own state file
    (``fedveil client --state``): what the site itself can vouch for, the server's claims left out."""
    if fmt not in _FORMATS:
        fail("--format", f"must be one of {', '.join(_FORMATS)} (got {fmt!r})")
    if plot_path is not None:
        if Path(plot_path).expanduser().resolve() == Path(ledger_path).expanduser().resolve():
            fail("--plot", f"is the ledger being read; writing the plot there would destroy it (got {plot_path})")
        parent = Path(plot_path).expanduser().resolve().parent
        if not parent.is_dir():
            fail("--plot", f"directory does not exist (got {plot_path})")
        if Path(plot_path).suffix.lower() != ".png":
            fail("--plot", f"must be a .png file (got {plot_path})")
    site = _load_site_state(ledger_path)
    if policy_path is not None and site is None:
        fail("--policy", "only applies to a site's state file (fedveil client --state)")
    headroom = _policy_headroom(site, policy_path) if site is not None and policy_path is not None else []
    from fedveil.clients.privacy import SitePrivacy

    # A site's ledger holds its protected releases only; what the site can vouch for (∞ after an
    # unprotected release) leads every format, so no form shows the ledger's finite ε alone.
    own = SitePrivacy.of(site, None, trust_server=False) if site is not None else None
    own_lines = own.report().replace("not trusting the server", "as recorded by the site") if own else ""
    caps_lines = ([f"caps of {policy_path} over every job recorded:" if headroom
                   else f"{policy_path} sets no cap over every job (max_user_epsilon, max_lifetime_local_epsilon)"]
                  + [cap.line() for cap in headroom]) if policy_path is not None else []
    if own is not None and fmt == "text":
        click.echo("\n".join([own_lines, *caps_lines]))
    ledger = site.ledger if site is not None else _load_ledger(ledger_path, run_id)
    from fedveil.dp.report import build_report, render_markdown, render_plot, render_text, report_to_dict

    try:
        report = build_report(ledger)
    except (ValueError, OverflowError, MemoryError) as err:
        fail("LEDGER", f"cannot account this ledger: {err}")
    if plot_path is not None:
        unbounded = (f"{len(own.unprotected)} release(s) without noise this site can rely on "
                     f"(first: {own.unprotected[0]})" if own is not None and own.unprotected else None)
        fig = render_plot(report, unbounded)
        try:
            fig.savefig(plot_path, format="png")
        except OSError as err:
            fail("--plot", f"cannot write {plot_path}: {err.strerror or err}")
        eprint(f"plot written to {plot_path}")
    if fmt == "json":
        payload = report_to_dict(report)
        if own is not None:  # what the site itself can vouch for, as the text report's first lines
            payload["site"] = own.to_dict()
            payload["federation_epsilon_protected_releases"] = payload["federation_epsilon"]
            payload["federation_epsilon"] = payload["site"]["user_epsilon"]  # null when infinite:
            payload["federation_epsilon_infinite"] = payload["site"]["user_epsilon_infinite"]
        if policy_path is not None:
            payload["site_policy_caps"] = {cap.setting: {"cap": cap.cap, "epsilon": finite_or_none(cap.epsilon),
                                                         "left": cap.left, "delta": cap.delta} for cap in headroom}
        print_json_last_line(payload)
    elif fmt == "markdown":
        if own is not None:
            head, *rest = own_lines.splitlines()
            click.echo(f"**{head}**\n\n" + "\n".join(f"- {line.strip()}" for line in rest) + "\n")
            if caps_lines:
                click.echo(f"**{caps_lines[0]}**\n\n" + "".join(f"- {line.strip()}\n" for line in caps_lines[1:]))
        click.echo(render_markdown(report), nl=False)
    else:
        click.echo(render_text(report), nl=False)


def _policy_headroom(site: SiteState, policy_path: str) -> list[CapHeadroom]:
    """The caps of the site policy file at ``policy_path``, against ``site``'s record."""
    from fedveil.clients.policy import PolicyError, SitePolicy
    from fedveil.clients.policy_settings import load_policy_file
    from fedveil.clients.privacy import policy_headroom

    try:
        settings = load_policy_file(policy_path)
    except PolicyError as err:
        fail("--policy", err.detail)
    try:
        # the file's settings, checked as a site would; the authority is not needed to read caps
        policy = SitePolicy(**{**settings, "trust_server": True})
    except PolicyError as err:
        fail(file_key("policy", err.field, "--policy", policy_path) if err.field in settings else "--policy",
             err.detail)
    return policy_headroom(site, policy)


def _load_site_state(path: str) -> SiteState | None:
    """A site's state file, or None if ``path`` is something else (a ledger or a run store)."""
    from fedveil.clients.site_state import STATE_FORMAT, SiteState, SiteStateError

    p = Path(path).expanduser()
    try:
        head = p.read_bytes()[:4096].decode("utf-8", errors="replace")
    except OSError:
        return None
    if f'"{STATE_FORMAT}"' not in head and STATE_FORMAT not in head:
        return None
    try:
        return SiteState.open(p)
    except SiteStateError as err:
        fail("LEDGER", str(err))


def _load_ledger(path: str, run_id: str | None) -> PrivacyLedger:
    """Read a ledger JSON file, or the ledger of a run in a SQLite run store (via the server's store)."""
    p = Path(path).expanduser()
    if not p.exists():
        fail("LEDGER", f"no such file (got {path})")
    if not p.is_file():
        fail("LEDGER", f"not a file (got {path})")
    try:
        raw = p.read_bytes()
    except OSError as err:
        fail("LEDGER", f"cannot read {path}: {err.strerror or err}")
    if raw.startswith(_SQLITE_MAGIC):
        from fedveil.server.store import StoreError, UnknownRunError, load_ledger

        try:
            ledger = load_ledger(p, run_id)
        except UnknownRunError as err:
            fail("--run", str(err))
        except StoreError as err:
            fail("LEDGER", str(err))
        except LedgerFormatError as err:
            fail("LEDGER", f"corrupt ledger in run store {path}: {err}")
        if not isinstance(ledger, PrivacyLedger):
            fail("LEDGER", f"run store {path} did not yield a privacy ledger")
        return ledger
    if run_id is not None:
        fail("--run", f"only applies to a run store; {path} is a ledger file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        fail("LEDGER", f"corrupt ledger {path}: not UTF-8 text")
    try:
        return PrivacyLedger.from_json(text)
    except LedgerFormatError as err:
        fail("LEDGER", f"corrupt ledger {path}: {err}")
    except (OverflowError, RecursionError) as err:
        fail("LEDGER", f"corrupt ledger {path}: {type(err).__name__}: a value is out of range or nested too deeply")


def register(group: click.Group) -> None:
    group.add_command(budget)
