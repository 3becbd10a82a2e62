"""One round's privacy parameters bound into its secure-aggregation session.

With distributed DP a site counts, in its own ledger, the noise of the other honest contributors
at the share the round announced (:mod:`fedveil.clients.admission`). That is only sound if every
honest site of the session was announced the *same* DP and encoding parameters: a server that
showed the victim a large noise share and the others a small one would make the victim's ledger
understate its ε. So the secure-aggregation context every party hashes into the session id (and
signs in active mode) ends with a digest of the round's ``dp`` and ``encoding`` sections: sites
shown different parameters derive different sessions, and the round aborts before any masked
input can be combined. Each site checks the digest against the sections it received.
"""

from __future__ import annotations

import hashlib
import struct

from fedveil.protocol import fedveil_pb2 as pb

BINDING_BYTES = 32
_DOMAIN = b"fedveil/round-binding/v1"


def round_binding(dp: pb.DpParams, encoding: pb.EncodingParams) -> bytes:
    """SHA-256 over the deterministic encodings of the round's ``dp`` and ``encoding`` sections."""
    digest = hashlib.sha256(_DOMAIN)
    for part in (dp, encoding):
        data = part.SerializeToString(deterministic=True)
        digest.update(struct.pack("<Q", len(data)) + data)
    return digest.digest()


def bound_context(base: bytes, dp: pb.DpParams, encoding: pb.EncodingParams) -> bytes:
    """The secure-aggregation context: ``base`` (run and task) followed by :func:`round_binding`."""
    return base + round_binding(dp, encoding)


def binding_problem(start: pb.RoundStart) -> str | None:
    """Why the RoundStart's secagg context does not bind the dp and encoding it carries, or None."""
    context = bytes(start.secagg.context)
    if len(context) < BINDING_BYTES or context[-BINDING_BYTES:] != round_binding(start.dp, start.encoding):
        return ("the round's secure-aggregation context does not bind the DP and encoding parameters this site was "
                "shown; other sites may have been shown different ones")
    return None
