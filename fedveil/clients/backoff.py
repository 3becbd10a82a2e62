"""Exponential backoff with jitter for clients that lose the server.

A site's client must ride out a server restart or a network blip without a human: it
retries with exponentially growing, jittered waits ("full jitter", so a crowd of clients
that lost the same server does not come back in lock-step), up to a cap per wait and a total
give-up time. Errors that retrying cannot fix (a refused token, a bad certificate, invalid
data) are not retried: the caller says which errors are transient.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from fedveil.errors import FedveilError

R = TypeVar("R")


class GaveUp(FedveilError, ConnectionError):
    """The server stayed unreachable for longer than the backoff policy allows."""

    def __init__(self, attempts: int, elapsed_s: float, last_error: BaseException | None) -> None:
        detail = f": {last_error}" if last_error is not None else ""
        super().__init__(f"gave up after {attempts} attempts over {elapsed_s:.1f} s{detail}")
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last_error = last_error


@dataclass(frozen=True)
class BackoffPolicy:
    """Wait ``uniform(0, min(max_delay_s, initial_delay_s * multiplier**k))`` before retry ``k``.

    ``give_up_after_s`` bounds the total time spent retrying one operation (``None``: forever);
    ``max_attempts`` bounds the number of tries (``None``: unbounded). ``jitter`` = 0 gives the
    deterministic upper envelope, 1 full jitter.
    """

    initial_delay_s: float = 0.2
    max_delay_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 1.0
    give_up_after_s: float | None = 300.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.initial_delay_s > 0:
            raise ValueError(f"initial_delay_s must be positive (got {self.initial_delay_s})")
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s}) must be at least initial_delay_s ({self.initial_delay_s})"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1 (got {self.multiplier})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1] (got {self.jitter})")
        if self.give_up_after_s is not None and self.give_up_after_s < 0:
            raise ValueError(f"give_up_after_s must be non-negative (got {self.give_up_after_s})")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")

    def ceiling(self, retry: int) -> float:
        """The largest wait before retry number ``retry`` (0-based)."""
        # cap the exponent so huge retry counts do not overflow a float
        return float(min(self.max_delay_s, self.initial_delay_s * self.multiplier ** min(retry, 64)))


@dataclass
class Backoff:
    """Stateful backoff for one operation: call :meth:`run`, or iterate :meth:`delays` yourself."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    seed: int | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    on_retry: Callable[[int, float, BaseException], None] | None = None

    def __post_init__(self) -> None:
        # Jitter only spreads reconnects in time; it protects nothing, so Python's PRNG is fine.
        self._rng = random.Random(self.seed)

    def delays(self) -> Iterator[float]:
        """The waits before retries 0, 1, 2, … (not bounded by the give-up time)."""
        retry = 0
        while True:
            ceiling = self.policy.ceiling(retry)
            yield ceiling * (1.0 - self.policy.jitter) + self._rng.uniform(0.0, ceiling * self.policy.jitter)
            retry += 1

    def run(self, operation: Callable[[], R], is_transient: Callable[[BaseException], bool]) -> R:
        """Call ``operation`` until it succeeds; retry transient errors, re-raise the others.

        Raises :class:`GaveUp` when the policy's attempt or time limit is reached.
        """
        start = self.clock()
        attempts = 0
        delays = self.delays()
        while True:
            attempts += 1
            try:
                return operation()
            except Exception as err:
                if not is_transient(err):
                    raise
                last: BaseException = err
            elapsed = self.clock() - start
            if self.policy.max_attempts is not None and attempts >= self.policy.max_attempts:
                raise GaveUp(attempts, elapsed, last)
            delay = next(delays)
            if self.policy.give_up_after_s is not None and elapsed + delay > self.policy.give_up_after_s:
                remaining = self.policy.give_up_after_s - elapsed
                if remaining <= 0:
                    raise GaveUp(attempts, elapsed, last)
                delay = remaining  # one last try right at the deadline
            if self.on_retry is not None:
                self.on_retry(attempts, delay, last)
            self.sleep(delay)
