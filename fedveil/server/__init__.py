"""The federation server: coordinator, run store, global model, optimizers and dashboard.

- :mod:`fedveil.server.coordinator` — the transport-independent protocol logic
  (:class:`~fedveil.server.coordinator.Coordinator`): cohorts, the secure-aggregation stages with
  deadlines and dropouts, evaluation, resume.
- :mod:`fedveil.server.store` — the SQLite run store (enrolment, runs, rounds, participants,
  dropouts, privacy ledger, checkpoints).
- :mod:`fedveil.server.training` — the global model's side of a round (encoding plan, DP,
  optimizer step); :mod:`fedveil.server.optimizers` — FedAvg, FedAdam, ...
- :mod:`fedveil.server.runner` — ``fedveil server``: the coordinator behind gRPC.
"""
