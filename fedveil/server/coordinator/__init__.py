"""The coordinator: the server's protocol logic, independent of any transport.

:class:`Coordinator` implements :class:`fedveil.protocol.transport.FederationService`: every
RPC is a method taking the authenticated caller's name and the decoded request (a protobuf
message object). The gRPC servicer (``fedveil.protocol.service``) and the in-process
simulation (``fedveil.protocol.transport.InProcessTransport``) call the same methods, so the
network adds transport and nothing else.

Two kinds of threads meet here, synchronised by one condition variable:

- **RPC handlers** validate a request (session, sequence number, run, round, nonce, stage,
  field sizes), hand secure-aggregation messages to the round's
  :class:`fedveil.secagg.server.SecAggServer` (which adds masked inputs into its running sum
  at once: the server holds O(m), never n vectors), and return. A poll waits on the condition
  until the caller has something to do (bounded by ``poll_wait``).
- **The driver** (:meth:`Coordinator.run`) runs the job: waits for a cohort, starts a round,
  closes each stage when every live participant has answered or its deadline passes (the rest
  are dropouts), applies the unmasked sum to the global model, and commits the round, its
  checkpoint and the privacy ledger to the store in one transaction. Stage closing runs outside
  the lock (unmasking is the heavy part) while late messages for that stage get ABORTED.

Restart: a coordinator opened on a store whose latest run has the same job settings resumes it
from the last completed round; rounds left running by a killed server are marked interrupted
and redone with a new cohort and nonce.

The package's parts, each named for its job: ``state`` (the shared state and types),
``sessions`` (join, credentials, polls), ``secagg_bridge`` (protobuf to secagg messages, the
twin of the client's driver), ``misconduct`` (share-box complaints and the sites they convict),
``refusal_tally`` (declines that name a member: who is barred from the round), ``site_reports``,
``rounds`` (the round driver with its stages and deadlines), ``attempt_endings`` (rejected
rounds, aborted attempts) and ``job`` (the job: retries, final evaluation, summary).
"""

from __future__ import annotations

from fedveil.server.coordinator.job import Coordinator
from fedveil.server.coordinator.state import (
    MAX_CREDENTIAL_BYTES,
    MAX_METRIC_NAME,
    MAX_METRICS,
    MAX_SHARE_BOX_BYTES,
    PUBLIC_KEY_BYTES,
    SECURE_SUM_ROW,
    SIGNATURE_BYTES,
    WAIT_RETRY_MS,
    JobError,
    JobSummary,
    Stage,
)

__all__ = [
    "MAX_CREDENTIAL_BYTES",
    "MAX_METRICS",
    "MAX_METRIC_NAME",
    "MAX_SHARE_BOX_BYTES",
    "PUBLIC_KEY_BYTES",
    "SECURE_SUM_ROW",
    "SIGNATURE_BYTES",
    "WAIT_RETRY_MS",
    "Coordinator",
    "JobError",
    "JobSummary",
    "Stage",
]
