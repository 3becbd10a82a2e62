"""Admission of chunked masked-input uploads (``UploadMaskedInput``): one site cannot stall a round.

An attacker's finding: a site that reused one header to open many upload streams held both upload
slots with two of them and tied up the server's worker threads with the rest, so every honest site
missed the masked-input stage. The rules, in the order an upload meets them:

1. **Streams per site** (:class:`StreamCounter`): a site (authenticated caller) has at most
   ``MAX_STREAMS_PER_SITE`` upload streams open at once, counted before the first chunk is read; one
   more is refused at once (ALREADY_EXISTS). Two, not one, so that an honest retry is not refused
   while the server has not yet noticed that the site's previous stream broke.
2. **One reservation per site and stage** (:class:`UploadReservation`, made by the coordinator under
   its lock when the header chunk arrives): it consumes the header's sequence number; a second stream
   with the same header (a replay) or another header for the same site and stage is refused at once
   (ALREADY_EXISTS). A reservation whose stream failed is released, so the site's honest retry (a
   new header) can proceed, at most ``MAX_UPLOAD_ATTEMPTS`` times per stage.
3. **Slots in arrival order** (:class:`SlotGate`): at most ``slots`` uploads receive data at once;
   the others wait, first come first served, without sending data (the ``fedveil-upload-slot``
   grant). At most ``max_waiting`` uploads wait at once (more get UNAVAILABLE and retry later), and
   since each site has one reservation, a waiting site is never overtaken more than once by any
   other: honest sites are not starved. The wait ends when the stage closes (ABORTED).
4. **Idle, rate and overall time** (:class:`UploadWatchdog`): a stream that sends no chunk for
   ``idle_s`` seconds (the header chunk included; not while it waits for its slot) is cancelled, and
   so is one that holds its slot longer than its overall bound, or that, ``idle_s`` after its slot
   was granted, has sent less than the minimum rate asks (a site dripping a byte every few seconds
   kept its slot for the whole stage, and two such sites kept every honest upload out: review of
   2026-12-07). A cancelled site's retry queues behind the uploads already waiting. One watchdog
   thread serves every upload, and every model download (``FetchModel``: a site that never read its
   streams froze every worker thread of the server).

Why ALREADY_EXISTS for every per-site refusal: it already means "a second submission for a stage;
do not resend, Poll", which is what the site should do, and the shipped client treats it so. It is
not RESOURCE_EXHAUSTED, which stays the server-wide limits (message size, calls in flight) and which
the client treats as fatal. Every refusal is logged by the servicer with the site's name and its
running count of refusals, never with payload bytes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fedveil.protocol.errors import Replayed, Unavailable

MAX_STREAMS_PER_SITE = 2
"""Upload streams one site may have open at once (an active one plus an honest retry racing it)."""
MAX_UPLOAD_ATTEMPTS = 3
"""Upload reservations one site may make per round stage (its first upload and two retries after a
broken stream). Refusals that are the server's doing (a full waiting queue) do not count."""


@dataclass(eq=False)
class UploadReservation:
    """One site's claim on the masked-input upload of one round stage.

    Made by the service (the coordinator) when an upload's header chunk arrives; ``size`` is the
    exact number of bytes the upload must carry. ``alive`` tells whether the stream that holds it is
    still open (the transport's ``context.is_active``), so that a reservation whose stream died
    without the server noticing yet does not block the site's retry.
    """

    site: str
    round: int
    nonce: bytes
    stage: int
    sequence: int
    size: int
    alive: Callable[[], bool] = field(default=lambda: True, repr=False)
    state: str = "reserved"
    """``reserved`` → ``completed`` (the input was accepted) or ``released`` (the upload failed)."""
    on_release: Callable[[UploadReservation, bool], None] | None = field(default=None, repr=False)
    still_wanted: Callable[[UploadReservation], bool] | None = field(default=None, repr=False)
    on_refused: Callable[[UploadReservation, str], None] | None = field(default=None, repr=False)
    """Told when the stream is refused after the reservation was made (the service then drops the site
    from the stage, as for any refused stage message)."""

    @property
    def held(self) -> bool:
        return self.state == "reserved"

    def wanted(self) -> bool:
        """Whether the stage this upload is for still takes it (False once the stage closed)."""
        return self.held and (self.still_wanted is None or self.still_wanted(self))

    def refuse(self, problem: str) -> None:
        """The stream that holds this reservation was refused for ``problem``, its sender's fault: a
        total size other than the masked input's, a chunk that overruns it or does not parse (gRPC
        delivers whole messages, so a broken connection produces none of these; a stream that ends
        short may be one, and is not refused this way)."""
        if self.state == "reserved" and self.on_refused is not None:
            self.on_refused(self, problem)

    def release(self, *, counted: bool = True) -> None:
        """Give the reservation back (idempotent; a completed one stays completed).

        ``counted``: the failed upload counts as one of the site's ``MAX_UPLOAD_ATTEMPTS``."""
        if self.state != "reserved":
            return
        if self.on_release is not None:
            self.on_release(self, counted)
        self.state = "released"


class StreamCounter:
    """Open streams of one RPC per site; at most ``limit`` at once (rule 1 of the module docstring)."""

    def __init__(self, limit: int = MAX_STREAMS_PER_SITE, *, rpc: str = "UploadMaskedInput",
                 advice: str = "one upload per stage: Poll") -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1 (got {limit})")
        self._limit = limit
        self._rpc, self._advice = rpc, advice
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def open(self, site: str) -> None:
        """Count one more stream of ``site``, or raise :class:`Replayed` at the limit."""
        with self._lock:
            if self._open[site] >= self._limit:
                raise Replayed(f"{self._rpc}: {site!r} already has {self._open[site]} stream(s) open "
                               f"(at most {self._limit}); {self._advice}")
            self._open[site] += 1

    def close(self, site: str) -> None:
        with self._lock:
            self._open[site] -= 1
            if self._open[site] <= 0:
                del self._open[site]

    @contextmanager
    def stream(self, site: str) -> Iterator[None]:
        self.open(site)
        try:
            yield
        finally:
            self.close(site)

    def open_streams(self, site: str) -> int:
        with self._lock:
            return self._open[site]


class _SlotWaiter:
    """One upload waiting in a :class:`SlotGate`: woken alone when the slot is handed to it."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False


class SlotGate:
    """``slots`` upload slots granted first come, first served, with at most ``max_waiting`` waiting.

    A waiting upload holds a worker thread (the synchronous gRPC server runs a stream in one), so the
    wait is bounded three ways: by ``max_waiting``, by the per-site rules (one reservation per site and
    stage, so the waiting uploads are at most the cohort) and by ``keep_waiting`` (the client left or
    the stage closed).

    A freed slot is handed straight to the first waiter, which alone is woken: with hundreds of
    uploads waiting (a large cohort's masked-input stage), waking them all at every grant cost the
    server quadratic thread wake-ups, each taking the interpreter lock from the uploads being received.
    Each waiter also wakes every ``poll_s`` to ask ``keep_waiting``."""

    def __init__(self, slots: int, max_waiting: int, *, poll_s: float = 0.25) -> None:
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"need slots >= 1 and max_waiting >= 0 (got {slots}, {max_waiting})")
        self._lock = threading.Lock()
        self._free = slots
        self._max_waiting = max_waiting
        self._queue: deque[_SlotWaiter] = deque()
        self._poll_s = poll_s
        self.peak_waiting = 0
        """The most uploads that waited at once (for tests and diagnostics)."""

    def acquire(self, keep_waiting: Callable[[], bool]) -> bool:
        """Wait for a slot in arrival order; False if ``keep_waiting()`` turned False first.

        Raises :class:`Unavailable` when ``max_waiting`` uploads wait already. ``keep_waiting`` is
        called without this gate's lock held (it may take the coordinator's)."""
        with self._lock:
            if self._free > 0 and not self._queue:
                self._free -= 1
                return True
            if len(self._queue) >= self._max_waiting:
                raise Unavailable(f"UploadMaskedInput: {len(self._queue)} uploads are waiting for a slot already; "
                                  "retry shortly")
            waiter = _SlotWaiter()
            self._queue.append(waiter)
            self.peak_waiting = max(self.peak_waiting, len(self._queue))
        while True:
            if waiter.event.wait(self._poll_s):
                return True  # the slot was handed over (granted is set before the event)
            if not keep_waiting():
                with self._lock:
                    if not waiter.granted:
                        self._queue.remove(waiter)
                        return False
                self.release()  # handed over while it gave up: pass the slot on
                return False

    def release(self) -> None:
        """Free a slot: hand it to the first waiter, if any."""
        with self._lock:
            if self._queue:
                waiter = self._queue.popleft()
                waiter.granted = True
                waiter.event.set()
            else:
                self._free += 1

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)


class UploadWatch:
    """One upload's timers (see :class:`UploadWatchdog`): :meth:`touch` on every chunk."""

    def __init__(self, cancel: Callable[[], None], idle_s: float, clock: Callable[[], float],
                 min_rate: float = 0.0) -> None:
        self._cancel = cancel
        self._idle_s = idle_s
        self._clock = clock
        self._min_rate = min_rate
        self._last = clock()
        self._deadline: float | None = None
        self._since: float | None = None
        self._bytes = 0
        self._paused = False
        self.reason = ""
        """Why the watchdog cancelled the stream ("" while it has not)."""

    def touch(self, nbytes: int = 0) -> None:
        """A chunk moved (``nbytes`` of data, counted against the minimum rate)."""
        self._last = self._clock()
        self._bytes += nbytes

    def pause(self) -> None:
        """Stop the idle timer (while the upload waits for its slot it is meant to send nothing)."""
        self._paused = True

    def resume(self, hold_s: float) -> None:
        """Restart the idle timer and bound the rest of the stream to ``hold_s`` seconds; from now on it
        must move data at the minimum rate (after a grace of ``idle_s``)."""
        self._last = self._clock()
        self._deadline = self._last + hold_s
        self._since, self._bytes = self._last, 0
        self._paused = False

    def check(self, now: float) -> bool:
        """Cancel the stream if it is over a bound; True when it did (or had)."""
        if self.reason:
            return True
        if not self._paused and now - self._last > self._idle_s:
            self.reason = f"sent no chunk for {self._idle_s:g} s"
        elif not self._paused and self._deadline is not None and now > self._deadline:
            self.reason = "held its upload slot past its overall time bound"
        elif not self._paused and self._since is not None and self._min_rate > 0 \
                and self._bytes < self._min_rate * (now - self._since - self._idle_s):
            self.reason = (f"moved {self._bytes} bytes in {now - self._since:.0f} s, below the minimum rate of "
                           f"{self._min_rate:g} bytes/s")
        else:
            return False
        self._cancel()
        return True


class UploadWatchdog:
    """One daemon thread that cancels stalled uploads (rule 4 of the module docstring).

    Started when the first upload registers and ended when none is left, so an idle server runs no
    extra thread; ``tick_s`` is the timers' resolution."""

    def __init__(self, *, tick_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self._tick_s = tick_s
        self._clock = clock
        self._lock = threading.Lock()
        self._watches: set[UploadWatch] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, cancel: Callable[[], None], idle_s: float, min_rate: float = 0.0) -> Iterator[UploadWatch]:
        w = UploadWatch(cancel, idle_s, self._clock, min_rate)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fedveil-upload-watchdog", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                self._watches.discard(w)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                watches = list(self._watches)
            now = self._clock()
            for w in watches:
                w.check(now)
            time.sleep(self._tick_s)
