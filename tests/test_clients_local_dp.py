import torch
from torch.utils.data import DataLoader

from fedveil.clients.local_dp import LocalDpClient, local_dp_config
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.task import model_to_vector
from fedveil.tasks.synthetic import task

torch.set_num_threads(1)


def test_config_from_round_parameters() -> None:
    fixed = local_dp_config(pb.LocalDpParams(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-6))
    assert fixed.noise_multiplier == 1.1 and fixed.target_epsilon is None and fixed.delta == 1e-6
    target = local_dp_config(pb.LocalDpParams(target_epsilon=3.0, planned_rounds=4, max_grad_norm=1.0))
    assert target.target_epsilon == 3.0 and target.noise_multiplier is None and target.planned_rounds == 4


def test_one_accountant_across_rounds_and_plain_state_dicts() -> None:
    assert task.synthetic_data is not None
    data = task.synthetic_data(0, 2, 1)
    model = task.build_model()
    client = LocalDpClient(seed=3)
    params = pb.LocalDpParams(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    epsilons = []
    for _ in range(2):
        loader = DataLoader(data, batch_size=32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = model_to_vector(model)
        dp_model, dp_opt, dp_loader = client.privatize(params, model, optimizer, loader)
        task.train_epoch(dp_model, dp_loader, dp_opt)
        state = client.finish_round()
        assert not any(k.startswith("_module.") for k in state)
        assert (model_to_vector(state) != before).any()
        spend = client.spend()
        assert spend is not None and spend.steps > 0 and spend.noise_multiplier == 1.0
        epsilons.append(spend.epsilon)
    assert 0 < epsilons[0] < epsilons[1]  # the same accountant keeps composing
