"""The job's model file (fedveil.model_file): written from the user's module, read by the server without
importing user code; ``fedveil init-model`` and ``fedveil server --model``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedveil
from fedveil.cli import main
from fedveil.dp.compat import UnsupportedLayerError, check_dp_trainable
from fedveil.model_file import ModelFileError, load_initial_model, model_file_task
from fedveil.model_spec import ModelSpec
from fedveil.server.config import ServerConfig, ServerConfigError


class Net(nn.Module):
    """An Opacus-tutorial-style CNN with a BatchNorm, which DP-SGD cannot train."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_a_local_dp_model_file_holds_the_dp_compatible_model_and_the_server_reads_it_without_user_code(
    tmp_path: Path,
) -> None:
    path = tmp_path / "init.safetensors"
    saved = fedveil.save_initial_model(Net(), path, dp="local")
    assert isinstance(saved.features[1], nn.GroupNorm)  # BatchNorm2d → GroupNorm before writing
    tensors, metadata = load_initial_model(path)
    assert metadata["fedveil.dp"] == "local"
    assert list(tensors) == list(ModelSpec.of(saved).names)
    task = model_file_task(path)
    server_model = task.build_model()  # no Net class involved
    assert type(server_model).__name__ == "FileModel"
    assert ModelSpec.of(server_model).difference(ModelSpec.of(saved)) == ""
    for name, value in saved.state_dict().items():
        assert torch.equal(server_model.state_dict()[name], value), name
    assert task.name == "model:init.safetensors"
    with pytest.raises(ModelFileError, match="has no training function"):
        task.train_epoch(server_model, None, None)  # type: ignore[arg-type]


def test_without_local_dp_the_model_is_saved_as_it_is(tmp_path: Path) -> None:
    model = Net()
    assert fedveil.save_initial_model(model, tmp_path / "m.safetensors") is model
    tensors, _ = load_initial_model(tmp_path / "m.safetensors")
    assert "features.1.running_mean" in tensors  # float buffers are federated too


def test_a_layer_dp_sgd_cannot_train_is_named_by_its_path_with_the_remedy() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"^BatchNorm2d at features\.1 is not trainable with DP-SGD "
                       r"\(BatchNorm cannot support training with differential privacy\); build the job's model "
                       r"with fedveil\.make_dp_compatible\(model\)$") as refused:
        check_dp_trainable(Net())
    assert refused.value.field == "model"
    check_dp_trainable(fedveil.make_dp_compatible(Net()))
    lstm = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(UnsupportedLayerError, match=r"LSTM at 1 is not trainable.*\(and 1 more layer\(s\)\)"):
        check_dp_trainable(lstm)


def test_bad_model_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file") as refused:
        load_initial_model(tmp_path / "missing.safetensors")
    assert refused.value.field == "--model"
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        load_initial_model(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ModelFileError, match=r"tensor 'w' has dtype torch\.int64"):
        load_initial_model(tmp_path / "int.safetensors")
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelFileError, match="tensor 'w' holds NaN"):
        load_initial_model(tmp_path / "nan.safetensors")
    with pytest.raises(ModelFileError, match="dp: expected one of") as bad_dp:
        fedveil.save_initial_model(Net(), tmp_path / "x.safetensors", dp="sample")
    assert bad_dp.value.field == "dp"


def test_server_config_takes_a_model_file_or_a_task_not_both() -> None:
    assert ServerConfig.from_flat(task="", model="init.safetensors", rounds=1, clients_per_round=2, min_clients=2).model
    with pytest.raises(ServerConfigError, match="give --model or --task, not both"):
        ServerConfig.from_flat(task="fedveil.tasks.synthetic", model="init.safetensors", rounds=1, clients_per_round=2,
                     min_clients=2)
    with pytest.raises(ServerConfigError, match="or give --model"):
        ServerConfig.from_flat(task="", rounds=1, clients_per_round=2, min_clients=2)


def test_init_model_command_writes_the_file_and_the_server_command_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "usernet.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LSTM(4, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "init.safetensors"
    assert main(["init-model", "--from", "usernet:make", "--dp", "local", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    names = list(load_initial_model(out)[0])
    assert "1.weight" in names and not any("running_mean" in n for n in names)  # GroupNorm, no BatchNorm
    assert main(["init-model", "--from", "usernet:nothing", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "usernet' has no callable 'nothing'" in capsys.readouterr().err
    sys.modules.pop("usernet", None)

    store = str(tmp_path / "run.sqlite")
    common = ["server", "--listen", "127.0.0.1:0", "--store", store, "--insecure", "--rounds", "1",
              "--clients-per-round", "2"]
    assert main([*common, "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "error: --model:" in capsys.readouterr().err
    assert main([*common, "--model", str(out), "--task", "fedveil.tasks.synthetic"]) == 2
    assert "one of the two" in capsys.readouterr().err
    assert main(common) == 2


def test_init_model_finds_a_module_in_the_current_directory_and_refuses_a_directory_as_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Review of 2026-12-07: the documented `fedveil init-model --from after:Net` failed unless PYTHONPATH=.,
    and `--out DIR` was a safetensors traceback."""
    (tmp_path / "besideme.py").write_text("from torch import nn\ndef make():\n    return nn.Linear(3, 1)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert main(["init-model", "--from", "besideme:make", "--out", "init.safetensors"]) == 0
        assert (tmp_path / "init.safetensors").exists()
        assert main(["init-model", "--from", "besideme:make", "--out", str(tmp_path)]) == 2
        assert "error: --out:" in capsys.readouterr().err
    finally:
        sys.modules.pop("besideme", None)
