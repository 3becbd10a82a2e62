"""``fedveil export``: the global model of a real run (a secure-aggregation job with central DP)
at a chosen round, as safetensors, torch and ONNX files that load back without fedveil and
predict as the global model does, to 1e-5."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedveil.cli import main
from fedveil.dp.ledger import FEDERATION, PrivacyLedger
from fedveil.server.model_export import ExportError, ExportRequest, export_model
from fedveil.server.store import RunStore
from fedveil.task import load_task, vector_to_model
from tests.server_helpers import TASK, Scripted, make_job, run_job, vectors


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run store holding a 2-round job with central DP (so each round has its own ε)."""
    tmp = tmp_path_factory.mktemp("export")
    names = ["a", "b", "c"]
    coordinator, store = make_job(tmp, names, rounds=2, weighted=False, dp="central", dp_clip=1.0,
                                  dp_noise_multiplier=2.0)
    small = [v * 0.2 for v in vectors(3)]
    summary = run_job(coordinator, [Scripted(coordinator, n, v) for n, v in zip(names, small, strict=True)])
    assert summary.status == "completed"
    store.close()
    return tmp / "run.db", coordinator.run_id


def global_model(db: Path, run_id: str, round_number: int) -> torch.nn.Module:
    with RunStore(db) as store:
        checkpoint = store.checkpoint(run_id, round_number)
    assert checkpoint is not None and checkpoint.version == round_number
    return vector_to_model(checkpoint.model, load_task(TASK).build_model()).eval()


def sample_inputs() -> torch.Tensor:
    task = load_task(TASK)
    assert task.synthetic_data is not None
    return task.synthetic_data(0, 3, 11).tensors[0][:64].float()


def user_epsilon_after(db: Path, run_id: str, round_number: int) -> float:
    with RunStore(db) as store:
        ledger = PrivacyLedger.from_json(store.ledger_json(run_id) or "")
    return next(h.epsilon_cumulative for h in ledger.party_history(FEDERATION) if h.round_index == round_number)


@pytest.mark.slow
def test_safetensors_and_torch_files_load_back_with_metadata_and_predict_as_the_global_model(
        finished_run: tuple[Path, str], tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    db, run_id = finished_run
    x = sample_inputs()
    expected = global_model(db, run_id, 1)(x).detach().numpy()
    assert not np.allclose(expected, global_model(db, run_id, 2)(x).detach().numpy(), atol=1e-5)  # rounds differ

    out = tmp_path / "model.safetensors"
    export_model(ExportRequest(store=db, out=out, format="safetensors", round=1))  # the latest run by default
    fresh = load_task(TASK).build_model().eval()
    fresh.load_state_dict(load_file(str(out)))
    np.testing.assert_allclose(fresh(x).detach().numpy(), expected, rtol=0, atol=1e-5)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["run_id"] == run_id and meta["round"] == "1" and meta["task"] == "synthetic-logreg"
    assert float(meta["epsilon"]) == pytest.approx(user_epsilon_after(db, run_id, 1), rel=1e-9)
    assert 0 < float(meta["epsilon"]) < user_epsilon_after(db, run_id, 2)  # ε at that round, not the total
    assert float(meta["delta"]) == pytest.approx(1e-5) and meta["dp"] == "central"
    assert json.loads(meta["input_shape"]) == [None, 10]

    saved = tmp_path / "model.pt"
    export_model(ExportRequest(store=db, out=saved, format="torch", run_id=run_id, round=1))
    bundle = torch.load(saved, weights_only=True)
    fresh = load_task(TASK).build_model().eval()
    fresh.load_state_dict(bundle["state_dict"])
    np.testing.assert_allclose(fresh(x).detach().numpy(), expected, rtol=0, atol=1e-5)
    assert bundle["metadata"] == {k: v for k, v in meta.items() if k != "format"}


@pytest.mark.slow
def test_the_onnx_file_passes_the_checker_and_onnxruntime_predicts_as_the_global_model(
        finished_run: tuple[Path, str], tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    db, run_id = finished_run
    out = tmp_path / "model.onnx"
    assert main(["export", "--store", str(db), "--format", "onnx", "--out", str(out)]) == 0  # latest round: 2
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["run_id"] == run_id and meta["round"] == "2" and meta["task"] == "synthetic-logreg"
    x = sample_inputs()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (predicted,) = session.run(None, {"features": x.numpy()})  # a batch of 64: the batch axis is dynamic
    np.testing.assert_allclose(predicted, global_model(db, run_id, 2)(x).detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_refusals_name_the_flag_at_fault(finished_run: tuple[Path, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    db, run_id = finished_run
    out = tmp_path / "m.safetensors"
    base = ["export", "--store", str(db), "--format", "safetensors", "--out", str(out)]
    assert main([*base, "--round", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --round: ") and "rounds 0 to 2" in err
    assert main([*base, "--run", "run-nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run: ") and run_id in err
    assert main([*base, "--round", "-1"]) == 2 and "--round" in capsys.readouterr().err
    assert main(["export", "--store", str(tmp_path / "none.db"), "--format", "torch", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --store: ")
    assert main([*base[:-1], str(tmp_path / "no" / "dir.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: --out: ")
    assert not out.exists()
    # a directory, or a place the OS refuses, is a one-line error in every format (they were tracebacks)
    for fmt in ("safetensors", "torch", "onnx"):
        assert main(["export", "--store", str(db), "--format", fmt, "--out", str(tmp_path)]) == 2
        assert "is a directory" in capsys.readouterr().err
        assert main(["export", "--store", str(db), "--format", fmt, "--out", "/proc/fedveil-model.bin"]) == 2
        assert capsys.readouterr().err.startswith("error: --out: cannot write")
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a machine without the 'export' extra
    with pytest.raises(ExportError) as missing:
        export_model(ExportRequest(store=db, out=tmp_path / "m.onnx", format="onnx"))
    assert missing.value.field == "format" and "fedveil[export]" in str(missing.value)
    assert main([*base, "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["round"] == "2" and last["run_id"] == run_id and out.exists()


@pytest.mark.slow
def test_under_local_dp_the_metadata_carries_the_largest_sites_sample_level_epsilon(tmp_path: Path) -> None:
    from safetensors import safe_open

    from fedveil.tasks.synthetic import task as synthetic
    from tests.attack_helpers import RESPONSIVE_DEADLINES, Consortium, job_config, turnkey
    from tests.attack_helpers import run_job as run_sites

    names = [f"site-{i}" for i in range(4)]
    consortium = Consortium.create(names)
    config = job_config(rounds=2, dp="local", dp_local_noise_multiplier=1.0, **RESPONSIVE_DEADLINES)
    summary, _results, errors = run_sites(tmp_path, config, synthetic,
                                          [turnkey(synthetic, n, i, consortium) for i, n in enumerate(names)])
    assert not errors and summary.completed_rounds == 2, (errors, summary)
    db = tmp_path / "run.sqlite"
    with RunStore(db) as store:
        ledger = PrivacyLedger.from_json(store.ledger_json(summary.run_id) or "")
    after = {r: max(h.epsilon_cumulative for site in names for h in ledger.party_history(site) if h.round_index == r)
             for r in (1, 2)}
    assert 0 < after[1] < after[2]
    for round_number in (1, 2):
        out = tmp_path / f"round{round_number}.safetensors"
        export_model(ExportRequest(store=db, out=out, round=round_number))
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["dp"] == "local" and meta["epsilon_level"].startswith("sample")
        assert float(meta["epsilon"]) == pytest.approx(after[round_number], rel=1e-9)


@pytest.mark.slow
def test_a_crafted_store_is_refused_in_one_line_and_never_has_its_task_called(
        finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Review of 2026-12-07: export called whatever function the store named as its task (``tempfile:mkdtemp``
    made a directory), and a checkpoint of the wrong length or a malformed ledger was a traceback."""
    import hashlib
    import shutil
    import sqlite3

    db, _run_id = finished_run
    short = np.zeros(5, np.float32).tobytes()  # a checkpoint of the wrong length, its digest made to match

    def crafted(name: str, sql: str, *params: object) -> Path:
        copy = tmp_path / f"{name}.db"
        shutil.copy(db, copy)
        with sqlite3.connect(copy) as conn:
            conn.execute(sql, params)
        return copy

    config = json.loads(sqlite3.connect(db).execute("SELECT config_json FROM runs").fetchone()[0])
    cases = {
        crafted("task", "UPDATE runs SET config_json=?", json.dumps({**config, "task": "tempfile:mkdtemp"})):
            "a task read from a file must name a Task object",
        crafted("short", "UPDATE checkpoints SET model=?, model_sha256=?", short, hashlib.sha256(short).hexdigest()):
            "cannot be read",
        crafted("ledger", "UPDATE ledger SET ledger_json=?", json.dumps({"format": 1})): "cannot be read",
    }
    before = set(Path("/tmp").iterdir()) if Path("/tmp").is_dir() else set()
    for store, message in cases.items():
        assert main(["export", "--store", str(store), "--format", "safetensors",
                     "--out", str(tmp_path / "m.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --store: ") and message in err and len(err.strip().splitlines()) == 1
    assert not {p for p in Path("/tmp").iterdir() if p.name.startswith("tmp")} - before
