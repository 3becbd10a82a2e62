"""What happens in a job, as events for listeners: rounds started, their stages closed, rounds
completed, rejected or aborted, evaluations, the job's end.

The coordinator persists every round in its store first; then it tells its listeners. A listener
sees only what the store keeps (released, noised values; never an un-noised sum or a site's
secret), so a dashboard, the demo's live view or a metrics exporter can watch a job without
subclassing the store or wrapping a transport. Listeners run on the coordinator's driver thread
after the round's store transaction, outside the coordinator's lock; a listener that raises is
logged and skipped, never allowed to stop the job (it is an observer, not a participant).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np

log = logging.getLogger("fedveil.server")


@dataclass(frozen=True)
class RoundStarted:
    """A round attempt was announced to its cohort."""

    run_id: str
    round: int
    attempt: int
    cohort: tuple[str, ...]
    purpose: str
    """``train`` or ``evaluate`` (the final, evaluation-only round)."""


@dataclass(frozen=True)
class RoundCompleted:
    """A training round's aggregate was released and the global model stepped (stored first)."""

    run_id: str
    round: int
    attempt: int
    survivors: int
    model: np.ndarray = field(repr=False)
    """The global model after this round (flat float32 vector, as the store keeps it)."""
    ledger_json: str | None = field(repr=False)
    """The user-level privacy ledger after this round, or None when user-level DP is off."""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageClosed:
    """A stage of a round attempt closed (all answered, or its deadline passed)."""

    run_id: str
    round: int
    attempt: int
    stage: str
    duration_s: float
    """From the stage's opening to its close (the server's monotonic clock)."""
    answered: int
    dropped: dict[str, str] = field(default_factory=dict)
    """Sites recorded as dropped when the stage closed → the stage they dropped out at."""


@dataclass(frozen=True)
class RoundRejected:
    """The unmasked sum was not one honest sites can produce: the round was skipped."""

    run_id: str
    round: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class RoundAborted:
    """A round attempt ended without a release (it may be retried)."""

    run_id: str
    round: int
    attempt: int
    stage: str
    reason: str


@dataclass(frozen=True)
class EvaluationRecorded:
    """The cohort's securely summed evaluation of a model version."""

    run_id: str
    round: int
    model_version: int
    metrics: dict[str, float]
    examples: float


@dataclass(frozen=True)
class JobFinished:
    """The job ended (completed, failed or stopped); ``summary`` is :meth:`JobSummary.to_dict`."""

    run_id: str
    summary: dict[str, Any]


JobEvent = Union[RoundStarted, StageClosed, RoundCompleted, RoundRejected, RoundAborted, EvaluationRecorded,
                 JobFinished]


class JobListener(Protocol):
    """Anything with ``on_event``: the demo's live view, a metrics exporter, a test's recorder."""

    def on_event(self, event: JobEvent) -> None: ...


class Listeners:
    """The coordinator's listeners: add one at any time; :meth:`emit` tells each in order."""

    def __init__(self, listeners: Iterable[JobListener] = ()) -> None:
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        self._queued: list[JobEvent] = []
        for listener in listeners:
            self.add(listener)

    def add(self, listener: JobListener) -> None:
        if not callable(getattr(listener, "on_event", None)):
            raise TypeError(f"listener: {type(listener).__name__} has no on_event(event) method")
        with self._lock:
            self._listeners.append(listener)

    def defer(self, event: JobEvent) -> None:
        """Queue ``event`` (cheap, safe under the coordinator's lock); :meth:`flush` delivers it."""
        with self._lock:
            self._queued.append(event)

    def emit(self, event: JobEvent) -> None:
        """Deliver the queued events, then ``event`` (call outside the coordinator's lock)."""
        self.defer(event)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            events, self._queued = self._queued, []
            listeners = list(self._listeners)
        for event in events:
            self._deliver(listeners, event)

    @staticmethod
    def _deliver(listeners: list[JobListener], event: JobEvent) -> None:
        for listener in listeners:
            try:
                listener.on_event(event)
            except Exception:  # an observer must never stop the job
                log.exception("listener %s failed on %s", type(listener).__name__, type(event).__name__)

    def __len__(self) -> int:
        return len(self._listeners)
