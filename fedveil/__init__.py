"""fedveil: privacy-preserving federated learning for PyTorch.

Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020) hides each
client's update from the server; differential privacy (DP-SGD, DP-FedAvg, distributed DP)
bounds what the released aggregate and the final model reveal.

One front door per user, each a single call with sensible defaults:

- a data scientist's site: [`federate`][fedveil.clients.api.federate] turns an existing PyTorch
  loop into one site of a federation; [`save_initial_model`][fedveil.model_file.save_initial_model]
  writes the job's model file from the same module, and
  [`make_dp_compatible`][fedveil.dp.compat.make_dp_compatible] makes a model DP-SGD-trainable;
- the job's operator: [`serve`][fedveil.front_doors.serve] runs a job behind gRPC until it completes;
- trying it out: [`simulate`][fedveil.front_doors.simulate] runs a whole federation on this machine;
- a privacy officer: [`compute_epsilon`][fedveil.dp.calibration.compute_epsilon],
  [`solve_noise_multiplier`][fedveil.dp.calibration.solve_noise_multiplier], and
  [`build_report`][fedveil.dp.report.build_report] over
  [`load_ledger`][fedveil.front_doors.load_ledger] (a ledger file or a server's run store).

They are imported on first use, so ``import fedveil`` loads neither torch nor gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedveil.lazy_exports import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on first use
    from fedveil.clients.api import federate
    from fedveil.dp.calibration import compute_epsilon, solve_noise_multiplier
    from fedveil.dp.compat import make_dp_compatible
    from fedveil.dp.report import build_report
    from fedveil.front_doors import load_ledger, serve, simulate
    from fedveil.model_file import save_initial_model

__all__ = [
    "build_report",
    "compute_epsilon",
    "federate",
    "load_ledger",
    "make_dp_compatible",
    "save_initial_model",
    "serve",
    "simulate",
    "solve_noise_multiplier",
]

_FRONT_DOORS: dict[str, str] = {
    "federate": "fedveil.clients.api",
    "serve": "fedveil.front_doors",
    "simulate": "fedveil.front_doors",
    "load_ledger": "fedveil.front_doors",
    "compute_epsilon": "fedveil.dp.calibration",
    "solve_noise_multiplier": "fedveil.dp.calibration",
    "build_report": "fedveil.dp.report",
    "save_initial_model": "fedveil.model_file",
    "make_dp_compatible": "fedveil.dp.compat",
}


__getattr__, __dir__ = lazy_exports(__name__, _FRONT_DOORS, __all__)
