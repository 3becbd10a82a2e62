"""``fedveil budget compute|noise|report``: happy paths and every bad-argument path (exit status 2)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedveil.cli import main
from fedveil.dp.accounting import RdpCurveEvent, SubsampledGaussianEvent
from fedveil.dp.calibration import compute_epsilon
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger

COMPUTE = [
    "budget", "compute", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5"
]
NOISE = ["budget", "noise", "--target-epsilon", "2", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


def run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_compute_prints_epsilon(capsys: pytest.CaptureFixture[str], accountant: str) -> None:
    code, out, err = run(capsys, [*COMPUTE, "--accountant", accountant, "--json"])
    assert code == 0, err
    data = last_json(out)
    expected = compute_epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=1000, delta=1e-5, accountant=accountant)
    assert data["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert data["delta"] == 1e-5 and data["accountant"] == accountant
    assert f"{expected:.6g}" in out.splitlines()[0]


def test_compute_defaults_to_rdp_and_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, COMPUTE)
    assert code == 0
    assert len(out.strip().splitlines()) == 1 and "epsilon =" in out and "(rdp;" in out


@pytest.mark.slow
@pytest.mark.parametrize(("accountant", "target"), [("rdp", 2.0), ("pld", 1.0), ("prv", 4.0)])
def test_noise_meets_the_target_within_one_percent(
    capsys: pytest.CaptureFixture[str], accountant: str, target: float
) -> None:
    args = [*NOISE, "--accountant", accountant, "--json"]
    args[args.index("--target-epsilon") + 1] = str(target)
    code, out, err = run(capsys, args)
    assert code == 0, err
    data = last_json(out)
    z = data["noise_multiplier"]
    eps = compute_epsilon(sample_rate=0.01, noise_multiplier=z, steps=1000, delta=1e-5, accountant=accountant)
    assert 0.99 * target <= eps <= target
    assert data["epsilon"] == pytest.approx(eps, rel=1e-12)


BAD = [
    (["--sample-rate", "0"], "--sample-rate"),
    (["--sample-rate", "1.5"], "--sample-rate"),
    (["--sample-rate", "nan"], "--sample-rate"),
    (["--sample-rate", "abc"], "--sample-rate"),
    (["--steps", "0"], "--steps"),
    (["--steps", "2.5"], "--steps"),
    (["--delta", "0"], "--delta"),
    (["--delta", "1"], "--delta"),
    (["--delta", "-1e-5"], "--delta"),
    (["--accountant", "gdp"], "--accountant"),
]


def _with(base: list[str], override: list[str]) -> list[str]:
    args = list(base)
    flag, value = override
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize(("override", "flag"), [*BAD, (["--noise-multiplier", "-1"], "--noise-multiplier"),
                                                (["--noise-multiplier", "0"], "--noise-multiplier")])
def test_compute_bad_arguments(capsys: pytest.CaptureFixture[str], override: list[str], flag: str) -> None:
    code, out, err = run(capsys, _with(COMPUTE, override))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0]


@pytest.mark.parametrize(("override", "flag"), [*BAD, (["--target-epsilon", "-2"], "--target-epsilon"),
                                                (["--target-epsilon", "inf"], "--target-epsilon")])
def test_noise_bad_arguments(capsys: pytest.CaptureFixture[str], override: list[str], flag: str) -> None:
    code, _, err = run(capsys, _with(NOISE, override))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--noise-multiplier", "1e160"], "cannot evaluate"),  # overflows inside the RDP computation
     (["--noise-multiplier", "0.01", "--sample-rate", "1", "--steps", "1", "--accountant", "pld"], "grid of"),
     # review of 2026-12-07: a million steps grew the composed grid until the process ran out of 24 GB
     (["--noise-multiplier", "1", "--sample-rate", "1", "--steps", "1000000", "--accountant", "pld"],
      "to compose 1000000 steps")],
)
def test_compute_refuses_compositions_it_cannot_evaluate_quickly_or_at_all(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    base = {"--sample-rate": "0.1", "--noise-multiplier": "1", "--steps": "5", "--delta": "1e-5"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code, _, err = run(capsys, ["budget", "compute", *[x for kv in base.items() for x in kv]])
    assert code == 2 and err.startswith("error: --accountant:") and fragment in err, err


def test_prv_never_reports_a_negative_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    from fedveil.dp.accounting import PRVAccountant, SubsampledGaussianEvent

    acc = PRVAccountant()
    acc.compose(SubsampledGaussianEvent(1.0, 100.0, 1))
    assert acc.get_epsilon(0.5) == 0.0  # Opacus's bound is -0.68 here


def test_compute_refuses_a_prv_grid_that_would_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    args = _with(_with(COMPUTE, ["--steps", "1000000"]), ["--accountant", "prv"])
    code, out, err = run(capsys, args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --accountant:") and "grid" in err


def test_missing_required_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, ["budget", "compute", "--sample-rate", "0.1"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--noise-multiplier" in err


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    ledger = PrivacyLedger(LedgerConfig(federation_epsilon_budget=8.0, client_epsilon_budget=6.0))
    fed = SubsampledGaussianEvent(0.2, 1.0)
    for r in range(6):
        clients = {f"hospital-{c}": SubsampledGaussianEvent(0.05, 1.0, 20) for c in range(3) if (r + c) % 3 != 0}
        ledger.reserve(r, federation=fed, clients=clients, mechanism="dp-fedavg", details={"clip_norm": 1.0})
    ledger.reserve(6, federation=RdpCurveEvent.from_function("skellam", lambda a: a / 50.0, params={"mu": 25.0}))
    path = tmp_path / "ledger.json"
    path.write_text(ledger.to_json())
    return path


@pytest.mark.slow
def test_report_text_json_markdown(capsys: pytest.CaptureFixture[str], ledger_file: Path) -> None:
    ledger = PrivacyLedger.from_json(ledger_file.read_text())
    code, out, err = run(capsys, ["budget", "report", str(ledger_file)])
    assert code == 0, err
    assert "hospital-1" in out and "skellam" in out and f"{ledger.epsilon():.4f}" in out

    code, out, _ = run(capsys, ["budget", "report", str(ledger_file), "--format", "json"])
    data = last_json(out)
    assert [r["round"] for r in data["rounds"]] == list(range(7))
    assert data["federation_epsilon"] == pytest.approx(ledger.epsilon())
    assert data["client_epsilons"]["hospital-2"] == pytest.approx(ledger.epsilon("hospital-2"))
    assert data["rounds"][6]["federation"]["mechanism"] == "skellam"
    assert data["rounds"][0]["federation"]["budget_remaining"] == pytest.approx(
        8.0 - data["rounds"][0]["federation"]["epsilon_cumulative"]
    )

    code, out, _ = run(capsys, ["budget", "report", str(ledger_file), "--format", "markdown"])
    assert code == 0 and out.startswith("# Privacy report") and "| round |" in out


@pytest.mark.slow
def test_report_plot_writes_a_png(capsys: pytest.CaptureFixture[str], ledger_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "eps.png"
    code, _, err = run(capsys, ["budget", "report", str(ledger_file), "--plot", str(png)])
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "plot written" in err


def test_report_bad_arguments(capsys: pytest.CaptureFixture[str], ledger_file: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "fedveil.privacy_ledger", "version": 1, "config": {}, "entries": [{"round": 0}]}')
    truncated = tmp_path / "truncated.json"
    truncated.write_text(ledger_file.read_text()[:200])
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    store = tmp_path / "run.sqlite"
    sqlite3.connect(store).execute("create table t (x)").connection.commit()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    same = tmp_path / "same.png"
    same.write_bytes(ledger_file.read_bytes())
    as_text = tmp_path / "as_text.json"  # a number written as a string must not be read as one
    text = ledger_file.read_text()
    as_text.write_text(re.sub(r'"noise_multiplier": ([0-9.e+-]+)', r'"noise_multiplier": "\1"', text, count=1))
    as_bool = tmp_path / "as_bool.json"
    as_bool.write_text(re.sub(r'"sample_rate": ([0-9.e+-]+)', '"sample_rate": true', text, count=1))
    cases = [
        (["budget", "report", str(as_text)], "LEDGER", "noise_multiplier must be a number"),
        (["budget", "report", str(as_bool)], "LEDGER", "sample_rate must be a number"),
        (["budget", "report", str(deep)], "LEDGER", "nested too deeply"),
        (["budget", "report", str(same), "--plot", str(same)], "--plot", "is the ledger being read"),
        (["budget", "report", str(tmp_path / "missing.json")], "LEDGER", "no such file"),
        (["budget", "report", str(tmp_path)], "LEDGER", "not a file"),
        (["budget", "report", str(corrupt)], "LEDGER", "entries[0]"),
        (["budget", "report", str(truncated)], "LEDGER", "not valid JSON"),
        (["budget", "report", str(binary)], "LEDGER", "UTF-8"),
        (["budget", "report", str(store)], "LEDGER", "not a fedveil run store"),
        (["budget", "report", str(ledger_file), "--run", "r1"], "--run", "only applies to a run store"),
        (["budget", "report", str(ledger_file), "--format", "html"], "--format", "html"),
        (["budget", "report", str(ledger_file), "--plot", str(tmp_path / "nodir" / "x.png")], "--plot", "directory"),
        (["budget", "report", str(ledger_file), "--plot", str(tmp_path / "x.pdf")], "--plot", ".png"),
    ]
    for args, flag, fragment in cases:
        code, out, err = run(capsys, args)
        lines = err.strip().splitlines()
        assert code == 2, args
        assert out == ""
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag}:") and fragment in lines[0], (args, lines)


@pytest.mark.slow
def test_report_reads_a_run_store(capsys: pytest.CaptureFixture[str], ledger_file: Path, tmp_path: Path) -> None:
    from fedveil.server.store import RunStore

    db = tmp_path / "runs.sqlite"
    with RunStore(db) as store:
        store.create_run("run-a", {"task": "demo"})
        store.save_ledger("run-a", ledger_file.read_text())
    empty = tmp_path / "empty.sqlite"
    with RunStore(empty) as store:
        store.create_run("run-b", {"task": "demo"})
    expected = PrivacyLedger.from_json(ledger_file.read_text()).epsilon()
    code, out, err = run(capsys, ["budget", "report", str(db), "--run", "run-a", "--format", "json"])
    assert code == 0, err
    assert last_json(out)["federation_epsilon"] == pytest.approx(expected)
    code, out, err = run(capsys, ["budget", "report", str(db)])  # the latest (only) run
    assert code == 0 and "hospital-0" in out
    code, out, err = run(capsys, ["budget", "report", str(empty)])  # its run has no ledger yet
    assert code == 2 and err.startswith("error: LEDGER:") and "no privacy ledger" in err
    code, out, err = run(capsys, ["budget", "report", str(db), "--run", "nope"])
    assert code == 2 and err.startswith("error: --run:") and "has no run 'nope'" in err


@pytest.mark.slow
def test_entry_point_exit_status(ledger_file: Path) -> None:
    exe = Path(sys.executable).with_name("fedveil")
    bad = subprocess.run([str(exe), *_with(COMPUTE, ["--delta", "2"])], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --delta:")
    ok = subprocess.run([str(exe), "budget", "report", str(ledger_file), "--format", "json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "rounds" in json.loads(ok.stdout.strip().splitlines()[-1])
