import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedveil.task import load_task, model_to_vector, vector_to_model
from fedveil.tasks.synthetic import generate, make_task, mlp, task, write_site_csv

torch.set_num_threads(1)


def test_same_arguments_same_data_and_sites_differ() -> None:
    x1, y1 = generate(2, 5, seed=7)
    x2, y2 = generate(2, 5, seed=7)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = generate(3, 5, seed=7)
    assert not np.array_equal(x1, x3)
    assert set(np.unique(y1)) <= {0.0, 1.0}


def test_bad_site_index_is_named() -> None:
    with pytest.raises(ValueError, match="client_index"):
        generate(5, 5, seed=0)


def test_csv_round_trip_is_bit_exact(tmp_path) -> None:
    path = write_site_csv(tmp_path / "site.csv", 1, 3, seed=11)
    loaded = task.load_dataset(path)
    assert task.synthetic_data is not None
    direct = task.synthetic_data(1, 3, 11)
    assert torch.equal(loaded.tensors[0], direct.tensors[0])
    assert torch.equal(loaded.tensors[1], direct.tensors[1])


def test_load_by_reference() -> None:
    assert load_task("fedveil.tasks.synthetic").name == "synthetic-logreg"
    assert load_task("fedveil.tasks.synthetic:mlp").name == "synthetic-mlp16"


@pytest.mark.parametrize("t", [task, mlp])
def test_local_training_learns(t) -> None:
    torch.manual_seed(0)
    assert t.synthetic_data is not None
    data = t.synthetic_data(0, 1, 3)
    model = t.build_model()
    before = t.evaluate(model, data)
    loader = DataLoader(data, batch_size=t.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = t.make_optimizer(model.parameters())
    for _ in range(10):
        t.train_epoch(model, loader, opt)
    after = t.evaluate(model, data)
    assert after["loss"] < before["loss"] - 0.1
    assert after["accuracy"] > 0.65


def test_vector_round_trip_through_a_model() -> None:
    model = make_task(n_features=4, hidden=3).build_model()
    vec = model_to_vector(model)
    assert vec.dtype == np.float32 and vec.shape == (4 * 3 + 3 + 3 + 1,)
    target = make_task(n_features=4, hidden=3).build_model()
    vector_to_model(vec, target)
    np.testing.assert_array_equal(model_to_vector(target), vec)
    with pytest.raises(ValueError, match="needs"):
        vector_to_model(vec[:-1], target)
