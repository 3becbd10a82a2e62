"""fedveil: privacy-preserving federated learning for PyTorch.

Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020) hides each
client's update from the server; differential privacy (DP-SGD, DP-FedAvg, distributed DP)
bounds what the released aggregate and the final model reveal.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``fedveil.federate`` (the client API for existing PyTorch loops), imported on first use."""
    if name == "federate":
        from fedveil.clients.api import federate

        return federate
    raise AttributeError(f"module 'fedveil' has no attribute {name!r}")
