"""The demo's data: the fixed split, the public-range scaling, the task schema, CSV export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedveil.demo import healthcare
from fedveil.demo.data import FEATURE_NAMES, N_FOLDS, hospital_plan, load_wdbc, make_split, public_ranges
from fedveil.task import SchemaError, load_task

torch.set_num_threads(1)


def test_split_partitions_every_patient_once_and_keeps_the_test_set_fixed() -> None:
    x, _ = load_wdbc()
    test_sets = []
    for fold in range(N_FOLDS):
        split = make_split(5, seed=0, fold=fold)
        parts = [h.features for h in split.hospitals] + [split.validation.features, split.test.features]
        stacked = np.concatenate(parts)
        assert len(stacked) == len(x)
        # every patient exactly once: compare sorted row fingerprints
        fp = np.sort(stacked @ np.arange(1, 31, dtype=np.float64))
        assert np.allclose(fp, np.sort(x @ np.arange(1, 31, dtype=np.float64)))
        test_sets.append(split.test.features)
    assert all(np.array_equal(test_sets[0], t) for t in test_sets)  # tuning folds never touch the test set
    vals = [make_split(5, 0, f).validation.features for f in range(N_FOLDS)]
    assert sum(len(v) for v in vals) == len(x) - len(test_sets[0])


def test_hospitals_are_non_iid_in_size_and_label_mix() -> None:
    split = make_split(5, seed=0)
    sizes = [h.size for h in split.hospitals]
    shares = [h.malignant_share for h in split.hospitals]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 3 * sizes[-1]
    assert max(shares) - min(shares) > 0.4
    assert all(0 < s < 1 for s in shares)
    assert abs(split.test.malignant_share - 212 / 569) < 0.02  # stratified


@pytest.mark.parametrize("n", [2, 3, 5, 8, 20, 60])
def test_hospital_plan_adds_up(n: int) -> None:
    plan = hospital_plan(n, 364, 135)
    assert sum(s for s, _ in plan) == 364 and sum(m for _, m in plan) == 135
    assert all(s >= 4 and 1 <= m <= s - 1 for s, m in plan)


def test_hospital_plan_rejects_too_many_hospitals() -> None:
    with pytest.raises(ValueError, match="too few"):
        hospital_plan(100, 364, 135)


def test_scaling_uses_public_bounds_not_data_and_maps_into_about_minus_one_one() -> None:
    lo, hi = public_ranges()
    x, _ = load_wdbc()
    model = healthcare.build_model()
    z = model.scale(torch.from_numpy(x)).numpy()
    assert np.all(z >= -1.0 - 1e-5) and np.all(z < 1.0)  # published ranges widened by 10 % cover the data
    assert np.allclose(model.scale(torch.tensor(lo, dtype=torch.float32)).numpy(), -1.0, atol=1e-5)
    assert np.allclose(model.scale(torch.tensor(hi, dtype=torch.float32)).numpy(), 1.0, atol=1e-5)
    # the scaling is monotone in every feature, so "higher value" keeps its meaning in the explanations
    grid = torch.from_numpy(np.linspace(np.maximum(lo, 0.0) + 1e-3, hi, 50, dtype=np.float32))
    assert np.all(np.diff(model.scale(grid).numpy(), axis=0) > 0)
    assert not any(k.startswith("scale") for k in model.state_dict())  # bounds are code, not trained state


def test_task_loads_by_reference_and_parses_its_own_csv(tmp_path: Path) -> None:
    task = load_task("fedveil.demo.healthcare:task")
    assert task is healthcare.task and task.schema.column_names[:-1] == list(FEATURE_NAMES)
    site = make_split(5, 0).hospitals[4]
    path = tmp_path / "site.csv"
    path.write_text(task.schema.to_csv(site.features, site.labels))
    ds = task.load_dataset(path)
    assert torch.allclose(ds.tensors[0], torch.from_numpy(site.features))
    assert torch.equal(ds.tensors[1], torch.from_numpy(site.labels))
    with pytest.raises(SchemaError, match="missing columns: malignant"):
        task.schema.parse_csv(",".join(FEATURE_NAMES) + "\n" + ",".join(["1"] * 30) + "\n")


def test_evaluate_reports_loss_accuracy_auc_and_keeps_training_mode() -> None:
    split = make_split(5, 0)
    model = healthcare.build_model()
    with torch.no_grad():
        model.linear.weight.fill_(1.0)
    model.train()
    ds = torch.utils.data.TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
    m = healthcare.evaluate(model, ds)
    assert model.training
    assert set(m) >= {"loss", "accuracy", "auc"} and 0 <= m["accuracy"] <= 1 and 0.5 < m["auc"] <= 1
    # the rank AUC agrees with a direct pair count
    with torch.no_grad():
        s = model(ds.tensors[0]).numpy()
    y = split.test.labels.astype(bool)
    pairs = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert math.isclose(m["auc"], float(pairs), rel_tol=1e-9)


def test_assessment_levels_and_exact_contributions() -> None:
    split = make_split(5, 0)
    model = healthcare.build_model()
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(1, 30, generator=torch.Generator().manual_seed(3)))
        model.linear.bias.fill_(0.2)
    a = healthcare.assess(model, split.test.features[5])
    assert math.isclose(a.logit, a.baseline_logit + sum(c.contribution for c in a.contributions), abs_tol=1e-5)
    assert math.isclose(a.probability, 1 / (1 + math.exp(-a.logit)), rel_tol=1e-6)
    assert a.level == healthcare.risk_level(a.probability)
    assert [healthcare.risk_level(p) for p in (0.1, 0.3, 0.6, 0.9)] == ["low", "moderate", "high", "very high"]
    far = split.test.features[5].copy()
    far[0] = 500.0
    assert "mean_radius" in healthcare.assess(model, far).confidence  # out-of-range caveat names the feature
    patient = dict(zip(FEATURE_NAMES, split.test.features[5].tolist(), strict=True))
    with pytest.raises(ValueError, match="worst_area"):
        healthcare.SCHEMA.parse_values({n: v for n, v in patient.items() if n != "worst_area"})
    with pytest.raises(ValueError, match=r"'mean_radius': -1\.0 is below the minimum 0"):
        healthcare.SCHEMA.parse_values({n: -1.0 for n in FEATURE_NAMES})
    with pytest.raises(ValueError, match=r"'mean_area': 100000\.0 is above the maximum 27400"):  # 10x the range
        healthcare.SCHEMA.parse_values({**patient, "mean_area": 1e5})
    with pytest.raises(ValueError, match=r"'mean_area': 1e\+39 is out of range"):  # finite in float64, inf in float32
        healthcare.SCHEMA.parse_values({**patient, "mean_area": 1e39})
    for bad in (True, "1_000", [1.0], "0x10", 10**400):
        with pytest.raises(ValueError, match="'mean_area'"):
            healthcare.SCHEMA.parse_values({**patient, "mean_area": bad})
    ok = healthcare.SCHEMA.parse_values({**patient, "mean_area": " 2.5e2 "})
    assert ok.dtype == np.float32 and ok[FEATURE_NAMES.index("mean_area")] == 250.0
    huge = split.test.features[5].copy()
    huge[3] = np.float32(3e38)  # finite input, but the model's output overflows
    with torch.no_grad():
        model.linear.weight.fill_(3e38)
    with pytest.raises(ValueError, match="not finite"):
        healthcare.assess(model, huge)


def test_export_csv_writes_each_hospital_and_a_schema(tmp_path: Path) -> None:
    from fedveil.cli import main

    out = tmp_path / "csv"
    assert main(["demo", "healthcare", "--hospitals", "3", "--export-csv", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["SCHEMA.md", "hospital-1.csv", "hospital-2.csv", "hospital-3.csv"]
    split = make_split(3)  # the demo's split
    for h in split.hospitals:
        x, y = healthcare.SCHEMA.parse_csv(out / f"{h.name}.csv")
        assert np.allclose(x, h.features) and np.array_equal(y, h.labels)
    schema = (out / "SCHEMA.md").read_text()
    assert all(f"`{n}`" in schema for n in [*FEATURE_NAMES, "malignant"])


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--hospitals", "1"], "--hospitals"), (["--rounds", "0"], "--rounds"), (["--dropout", "1.5"], "--dropout"),
     (["--dp", "magic"], "--dp"), (["--dashboard", "70000"], "--dashboard"), (["--hospitals", "41"], "--hospitals")],
)
def test_bad_flags_are_one_line_errors(args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fedveil.cli import main

    assert main(["demo", "healthcare", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:")


@pytest.mark.parametrize("flag", ["--out", "--export-csv"])
def test_output_directories_that_cannot_exist_are_one_line_errors(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedveil.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for target, words in ((a_file, "exists and is not a directory"), (a_file / "sub", "cannot create directory")):
        assert main(["demo", "healthcare", flag, str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {flag}:") and words in err[0], err
    assert a_file.read_text() == "keep me"  # nothing replaced


@pytest.mark.parametrize("blocker", ["report.md", "privacy_utility.png", "hospitals"])
def test_out_entries_of_the_wrong_kind_are_refused_before_any_training(
    blocker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedveil.cli import main

    if blocker == "hospitals":
        (tmp_path / blocker).write_text("not a directory")
    else:
        (tmp_path / blocker).mkdir()
    assert main(["demo", "healthcare", "--in-process", "--rounds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out:") and blocker in err[0], err
    assert not (tmp_path / "report.json").exists()
