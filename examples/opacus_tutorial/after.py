"""An Opacus-tutorial-style script, after federation: the same script as one site of a TLS job.

Run in a folder holding the site's files from its operators: ``site.token`` (fedveil enroll),
``hub-ca.pem`` (the server's CA), ``site.pem`` and ``site.cred`` (its identity key and credential,
fedveil authority issue) and ``authority.pub`` (the consortium authority it pins). The server runs
the job from a model file (docs/federate-your-loop.md); each epoch of ``before.py`` is a round.
"""

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedveil

EPOCHS = 3
EPSILON, DELTA, MAX_GRAD_NORM = 8.0, 1e-5, 1.0


def load_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 3, 16, 16, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    criterion = nn.CrossEntropyLoss()
    for x, y in loader:
        if len(y) == 0:  # Poisson sampling can draw an empty batch
            continue
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def test(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


if __name__ == "__main__":
    train_data, test_data = load_data()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_loader = DataLoader(train_data, batch_size=32)
    test_loader = DataLoader(test_data, batch_size=64)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, epochs=EPOCHS,
        target_epsilon=EPSILON, target_delta=DELTA, max_grad_norm=MAX_GRAD_NORM)

    federation = fedveil.federate(server="hub.example.org:7000", model=model, token=open("site.token").read(),
                                  ca_cert="hub-ca.pem", identity_key="site.pem", credential="site.cred",
                                  authority="authority.pub", privacy_engine=privacy_engine, num_examples=192)
    for rnd in federation:
        train(model, train_loader, optimizer)
        rnd.submit(model)
        print(f"round {rnd.number}: accuracy {test(model, test_loader):.3f}, ε = {federation.privacy.epsilon:.2f}")
