"""fedveil: privacy-preserving federated learning for PyTorch.

Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020) hides each
client's update from the server; differential privacy (DP-SGD, DP-FedAvg, distributed DP)
bounds what the released aggregate and the final model reveal.
"""

__version__ = "0.1.0"
