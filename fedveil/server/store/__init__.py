"""The run store: one SQLite file (stdlib ``sqlite3``, WAL mode) holding a federation's history.

Tables: ``clients`` and ``tokens`` (enrolment; token secrets are never stored, only SHA-256
digests), ``runs`` (one per job: its configuration and status), ``rounds`` (one row per round
attempt: cohort size, survivors, outcome, the released aggregate), ``participants`` (who was in
which round, with their secagg id and the last stage they completed), ``dropouts`` (who dropped
at which stage), ``convictions`` (sites a share-box complaint proved at fault, left out of the
rest of their run), ``credential_bars`` (sites enough members declined for their credential, with
the digest of that roster entry), ``evaluations`` (federated evaluation metrics per client and model version),
``client_privacy`` (clients' reported sample-level spend), ``ledger`` (the privacy ledger JSON of
each run) and ``checkpoints`` (the global model after every completed round, with the server
optimizer and DP state needed to resume).

Durability: every round completes in ONE transaction (round row, checkpoint, ledger, optimizer
state), with ``synchronous=FULL``, so a server killed at any point finds either the round
complete with all its state, or not complete at all, and resumes from the last completed round.
No secret keys or Shamir shares are ever written here.

The package's parts, each named for its job: ``schema`` (tables, records, the connection),
``sites``, ``runs``, ``checkpoints`` and ``run_store`` (the class, and ledger loading).
"""

from __future__ import annotations

from fedveil.server.store.checkpoints import pack_state, unpack_state
from fedveil.server.store.run_store import (
    RunStore,
    UnknownRunError,
    is_run_store,
    load_ledger,
)
from fedveil.server.store.schema import (
    NAME_PATTERN,
    SCHEMA_VERSION,
    Checkpoint,
    EnrollmentError,
    RoundRecord,
    RunRecord,
    StoreError,
)

__all__ = [
    "NAME_PATTERN",
    "SCHEMA_VERSION",
    "Checkpoint",
    "EnrollmentError",
    "RoundRecord",
    "RunRecord",
    "RunStore",
    "StoreError",
    "UnknownRunError",
    "is_run_store",
    "load_ledger",
    "pack_state",
    "unpack_state",
]
