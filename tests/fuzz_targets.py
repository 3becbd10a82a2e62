"""Fuzz targets: the real coordinator during a real job, the real gRPC service, the real dashboard.

Each target takes one fuzzed input, sends it, and classifies what came back. A refusal that the
protocol defines (a :class:`~fedveil.protocol.errors.ProtocolError`, i.e. a gRPC status other
than INTERNAL/UNKNOWN; an HTTP 4xx) is fine. A failure is: an exception the service does not
map to a status (the gRPC servicer would answer INTERNAL), a gRPC INTERNAL or UNKNOWN, an HTTP
5xx, a response that echoes a traceback, exception text or a filesystem path, or honest sites
that can no longer finish their job.
"""

from __future__ import annotations

import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedveil.protocol import PROTOCOL_VERSION, SERVICE_NAME
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import ProtocolError
from fedveil.protocol.transport import ClientSession
from fedveil.server.coordinator import JobSummary
from tests.fuzz_inputs import apply_edits
from tests.server_helpers import Scripted, make_job, vectors

#: RPC name → (request type, coordinator method) for the unary RPCs a site can call.
UNARY_RPCS: dict[str, tuple[type[Any], str]] = {
    "Join": (pb.JoinRequest, "join"), "Poll": (pb.PollRequest, "poll"),
    "RespondToRound": (pb.RoundResponse, "respond_to_round"),
    "RevealContribution": (pb.RevealRequest, "reveal_contribution"),
    "AdvertiseKeys": (pb.AdvertiseKeysRequest, "advertise_keys"), "ShareKeys": (pb.ShareKeysRequest, "share_keys"),
    "SubmitMaskedInput": (pb.MaskedInputRequest, "submit_masked_input"),
    "ConfirmSurvivors": (pb.ConfirmSurvivorsRequest, "confirm_survivors"), "Unmask": (pb.UnmaskRequest, "unmask"),
    "ReportMetrics": (pb.MetricsReport, "report_metrics"), "FetchModel": (pb.FetchModelRequest, "fetch_model"),
}
FUZZED_RPCS = (*UNARY_RPCS, "UploadMaskedInput")


@dataclass
class Outcomes:
    """What the fuzzed inputs got: counts per outcome, and the failures with their evidence."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def ok(self, kind: str) -> None:
        self.counts[kind] += 1

    def fail(self, evidence: str) -> None:
        self.counts["FAILURE"] += 1
        if len(self.failures) < 20:
            self.failures.append(evidence)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class FederationUnderFuzz:
    """A passive job on the real coordinator: ``honest`` scripted sites train while ``mallory``
    (an enrolled site with a real session, polling like a site) sends fuzzed requests."""

    def __init__(self, tmp_path: Path, *, honest: int = 5, rounds: int = 2) -> None:
        self.names = [f"site-{i}" for i in range(honest)]
        self.coordinator, self.store = make_job(tmp_path, [*self.names, "mallory"], rounds=rounds, weighted=False,
                                                clients_per_round=honest, min_clients=honest - 1,
                                                stage_timeout=2.0)
        self.honest = [Scripted(self.coordinator, n, v) for n, v in zip(self.names, vectors(honest), strict=True)]
        self.summary: list[JobSummary] = []
        self.outcomes = Outcomes()
        self.accepted: list[tuple[str, int, Any]] = []
        """Fuzzed requests the coordinator accepted: (rpc, mallory's current round, request)."""
        self._session: ClientSession | None = None
        self._round: tuple[int, bytes] = (0, b"")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> FederationUnderFuzz:
        for site in self.honest:
            self._threads.append(threading.Thread(target=site.run, daemon=True))
        self._threads.append(threading.Thread(target=self._mallory_polls, daemon=True))
        driver = threading.Thread(target=lambda: self.summary.append(self.coordinator.run()), daemon=True)
        self._threads.append(driver)
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + 20
        while self._session is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def _join(self) -> None:
        joined = self.coordinator.join("mallory", pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                                 task_name="synthetic-logreg"))
        self._session = ClientSession.from_join(joined)

    def _mallory_polls(self) -> None:
        while not self._stop.is_set():
            try:
                if self._session is None:
                    self._join()
                assert self._session is not None
                resp = self.coordinator.poll("mallory", pb.PollRequest(header=self._session.header(),
                                                                       max_wait_ms=200))
                if resp.WhichOneof("instruction") == "round_start":
                    self._round = (resp.round_start.round, bytes(resp.round_start.round_nonce))
                elif resp.WhichOneof("instruction") == "job_done":
                    return
            except ProtocolError:
                self._session = None  # e.g. a fuzzed sequence number ran ahead: join again
                time.sleep(0.05)

    def base_request(self, rpc: str) -> Any:
        """A well-formed request of ``rpc`` with mallory's current session, round and nonce."""
        session = self._session
        number, nonce = self._round
        header = session.header(number, nonce) if session is not None else pb.RequestHeader()
        if rpc == "Join":
            return pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg", num_examples=10)
        cls, _ = UNARY_RPCS.get(rpc, (pb.MaskedInputChunk, ""))
        request = cls(header=header)
        if rpc == "RespondToRound":
            request.accept, request.commitment, request.weight = True, bytes(32), 1.0
        elif rpc == "SubmitMaskedInput":
            request.masked_vector = bytes(48)
        elif rpc == "ReportMetrics":
            request.num_examples = 10
            request.metrics.add(name="loss", value=0.5)
            request.privacy.CopyFrom(pb.LocalPrivacySpend(epsilon=1.0, delta=1e-5, noise_multiplier=1.0,
                                                          sample_rate=0.1, steps=10, accountant="rdp"))
        elif rpc == "UploadMaskedInput":
            request.total_bytes, request.data = 48, bytes(48)
        return request

    def send(self, rpc: str, changes: Sequence[tuple[tuple[str, ...], Any]]) -> None:
        request = apply_edits(self.base_request(rpc), changes)
        try:
            if rpc == "UploadMaskedInput":
                reservation = self.coordinator.masked_input_size("mallory", request.header, lambda: True)
                self.coordinator.submit_masked_vector("mallory", request.header, request.data, reservation)
            else:
                getattr(self.coordinator, UNARY_RPCS[rpc][1])("mallory", request)
            self.outcomes.ok("accepted")
            self.accepted.append((rpc, self._round[0], request))
        except ProtocolError as err:
            self.outcomes.ok(type(err).__name__)
        except Exception:  # the gRPC servicer would answer INTERNAL
            self.outcomes.fail(f"{rpc} {changes!r}: {traceback.format_exc(limit=6)}")

    def finish(self, timeout: float = 120.0) -> JobSummary | None:
        """Wait for the job; stop mallory; the summary, or None if it did not finish in time."""
        deadline = time.monotonic() + timeout
        while not self.summary and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if not self.summary:
            self.coordinator.stop()
        for thread in self._threads:
            thread.join(10)
        return self.summary[0] if self.summary else None

    def close(self) -> None:
        self.store.close()

    def honest_errors(self) -> dict[str, str]:
        return {s.name: repr(s.error) for s in self.honest if s.error is not None}

    def released_mean_is_exact(self) -> bool:
        """Every released aggregate is exactly the mean of the honest sites that completed that
        round (mallory never got a fuzzed input into a released sum)."""
        completed = [r for r in self.store.rounds(self.coordinator.run_id) if r.status == "completed"]
        for record in completed:
            survivors = [s for s in self.honest if (record.round, pb.ROUND_OUTCOME_COMPLETED) in s.results]
            aggregate = self.store.aggregate(self.coordinator.run_id, record.round)
            if record.survivors != len(survivors) or aggregate is None:
                return False
            expected = np.mean([s.sent[record.round] for s in survivors], axis=0)
            if not np.allclose(aggregate, expected, atol=1e-4):
                return False
        return bool(completed)


# -- the gRPC service --------------------------------------------------------------------------

BAD_GRPC_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def grpc_call(channel: grpc.Channel, rpc: str, payload: bytes, token: str | None, outcomes: Outcomes) -> None:
    """One raw unary call (server-streaming for FetchModel, client-streaming for uploads)."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    path = f"/{SERVICE_NAME}/{rpc}"
    try:
        if rpc == "FetchModel":
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _ in stream(payload, metadata=metadata, timeout=5):
                pass
        elif rpc == "UploadMaskedInput":
            upload = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
            upload(iter([payload, payload[: len(payload) // 2]]), metadata=metadata, timeout=5)
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                payload, metadata=metadata, timeout=5)
        outcomes.ok("OK")
    except grpc.RpcError as err:
        code = err.code()
        if code in BAD_GRPC_CODES:
            outcomes.fail(f"{rpc} {payload[:60]!r}: {code.name}: {err.details()}")
        else:
            outcomes.ok(code.name)


# -- the dashboard -----------------------------------------------------------------------------

LEAKS = ("Traceback", "File \"", "Error:", "/tmp/", "/work/", "/root/", ".py\"")


def dashboard_call(base_url: str, method: str, path: str, body: bytes, headers: dict[str, str], token: str | None,
                   outcomes: Outcomes, *, secrets: Sequence[str] = ()) -> int | None:
    sent = {"X-Fedveil-Request": "1", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base_url.rstrip("/") + path, data=body or None, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        outcomes.fail(f"{method} {path}: no answer ({err})")
        return None
    text = raw.decode("utf-8", "replace")
    if status >= 500:
        outcomes.fail(f"{method} {path} {body[:80]!r}: HTTP {status}: {text[:200]}")
    elif status >= 400 and any(leak in text for leak in (*LEAKS, *secrets)):
        outcomes.fail(f"{method} {path}: HTTP {status} leaks: {text[:200]}")
    elif any(secret in text for secret in secrets):
        outcomes.fail(f"{method} {path}: a secret is echoed")
    else:
        outcomes.ok(f"HTTP {status // 100}xx")
    return status
