"""The benchmark's exactness check: each simulated site also adds its plaintext update to a per-worker
sum, so that the driver can compare the securely released aggregate with the plain one.

Only benchmarks use this (``fedveil bench simulate``), on synthetic data: a real site never reveals
its update, and the simulated ones only reveal it to the measuring harness, summed per worker. A
round counts a site's update only when the site's outcome is ``completed`` (its masked input was
in the sum); the weight is the one the site declared when it accepted the round (1 when the round
is unweighted), as the coordinator's weighted mean uses.
"""

from __future__ import annotations

import threading

import numpy as np
from torch.utils.data import TensorDataset

from fedveil.clients.api import run_client
from fedveil.clients.participation import declared_weight
from fedveil.clients.round import Round
from fedveil.clients.session import Federation, RoundOutcome
from fedveil.simulation.faults import SimulatedDropout
from fedveil.task import Task


class PlainSums:
    """Per round: Σ weight·update (float64) and Σ weight over the sites whose input was in the sum."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sums: dict[int, tuple[np.ndarray, float]] = {}

    def add(self, round_number: int, update: np.ndarray, weight: float) -> None:
        with self._lock:
            total, weights = self.sums.get(round_number, (np.zeros(update.size, np.float64), 0.0))
            total += weight * update.astype(np.float64)
            self.sums[round_number] = (total, weights + weight)

    def merge(self, other: dict[int, tuple[np.ndarray, float]]) -> None:
        """Add another worker's sums (the driver gathers one per worker)."""
        with self._lock:
            for number, (total, weight) in other.items():
                mine, weights = self.sums.get(number, (np.zeros(total.size, np.float64), 0.0))
                self.sums[number] = (mine + total, weights + weight)

    def mean(self, round_number: int) -> np.ndarray | None:
        entry = self.sums.get(round_number)
        return None if entry is None or entry[1] <= 0 else entry[0] / entry[1]


def run_recording_site(federation: Federation, task: Task, dataset: TensorDataset,
                       sums: PlainSums) -> list[RoundOutcome]:
    """:func:`fedveil.clients.api.run_client` (injected dropouts leave only their round) that also
    adds each completed round's plaintext update to ``sums``."""

    def record(rnd: Round, outcome: RoundOutcome) -> None:
        if outcome.outcome == "completed":
            weight = declared_weight(federation, rnd.start_message) or 1.0
            sums.add(rnd.number, federation.spec.vector(rnd.model) - rnd.global_vector, weight)

    return run_client(federation, task, dataset, leave_round_on=(SimulatedDropout,), after_round=record)
