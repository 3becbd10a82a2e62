"""Simulation backends: a whole federation on one machine, with the real server and client code.

- :mod:`fedveil.simulation.backends` — in-process (client threads around one coordinator), and
  what every backend shares: the simulated sites' identities come from an in-memory authority
  (:class:`SimulatedSites`).
- :mod:`fedveil.simulation.process_backend` — processes (a ``fedveil server`` process and one
  ``fedveil client`` process per site).
- :mod:`fedveil.simulation.ray_backend` — Ray: the coordinator behind gRPC in the driver and the sites
  in a pool of Ray actors (:mod:`fedveil.simulation.site_host`), locally or across a Ray cluster.
- :mod:`fedveil.simulation.host` — the coordinator side: a job on a real coordinator and store.
- :mod:`fedveil.simulation.processes` — starting, watching and stopping the processes.
- :mod:`fedveil.simulation.netbench` — the network benchmark behind ``fedveil bench network``.

This package may import both :mod:`fedveil.server` and :mod:`fedveil.clients`; neither imports it.
"""

BACKENDS = ("in-process", "processes", "ray")
"""The simulation backends, as ``fedveil simulate --backend`` and ``fedveil.simulate(backend=...)`` name them."""
