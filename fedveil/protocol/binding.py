"""The round's terms bound into its secure-aggregation session.

A server that shows sites different terms inside one session can defeat secure aggregation without
breaking any of it. Two attacks it closes:

- **Model or settings inconsistency** (Pasquini, Francati and Ateniese, CCS 2022). Every site but
  the victim is shown a learning rate of 10⁻³⁰ (or a model crafted to zero their gradients): their
  updates are exactly zero, and the one unmasked sum is the victim's update.
- **A ledger that understates ε.** With distributed DP a site counts, in its own ledger, the noise of
  the other honest contributors at the share the round announced (:mod:`fedveil.clients.admission`).
  A server that showed the victim a large noise share and the others a small one would make the
  victim's ledger understate its ε.

So the secure-aggregation context every party hashes into the session id (and signs in active mode)
ends with a digest of the round's terms: the ``dp``, ``encoding`` and ``training`` sections, the
round number, its purpose, and the global model as each site names it from the values it loads
(:func:`fedveil.protocol.codec.model_digest`, never the server's ``sha256`` field). Sites shown
different terms derive different sessions, and the round aborts before any masked input can be
combined. Each site checks the digest against what it received.
"""

from __future__ import annotations

import hashlib
import struct

from fedveil.protocol import fedveil_pb2 as pb

BINDING_BYTES = 32
MODEL_DIGEST_BYTES = 32
_DOMAIN = b"fedveil/round-binding/v2"


def round_terms(round_number: int, purpose: int, dp: pb.DpParams, encoding: pb.EncodingParams,
                training: pb.TrainingParams) -> pb.RoundStart:
    """The bound fields of a RoundStart, as the server holds them before it announces the round."""
    return pb.RoundStart(round=round_number, purpose=purpose, dp=dp, encoding=encoding,  # type: ignore[arg-type]
                         training=training)


def round_binding(terms: pb.RoundStart, model_digest: bytes) -> bytes:
    """SHA-256 over the deterministic encodings of ``terms``' dp, encoding and training sections, its
    round number and purpose, and ``model_digest``."""
    if len(model_digest) != MODEL_DIGEST_BYTES:
        raise ValueError(f"model_digest: expected {MODEL_DIGEST_BYTES} bytes (got {len(model_digest)})")
    digest = hashlib.sha256(_DOMAIN)
    for part in (terms.dp, terms.encoding, terms.training):
        data = part.SerializeToString(deterministic=True)
        digest.update(struct.pack("<Q", len(data)) + data)
    digest.update(struct.pack("<II", terms.round, terms.purpose) + model_digest)
    return digest.digest()


def bound_context(base: bytes, terms: pb.RoundStart, model_digest: bytes) -> bytes:
    """The secure-aggregation context: ``base`` (run and task) followed by :func:`round_binding`."""
    return base + round_binding(terms, model_digest)


def binding_problem(start: pb.RoundStart, model_digest: bytes) -> str | None:
    """Why the RoundStart's secagg context does not bind the terms it carries and the model this site
    loaded (``model_digest``, the site's own), or None."""
    context = bytes(start.secagg.context)
    if len(context) < BINDING_BYTES or context[-BINDING_BYTES:] != round_binding(start, model_digest):
        return ("the round's secure-aggregation context does not bind the model, training settings, DP and "
                "encoding parameters this site was shown; other sites may have been shown different ones")
    return None
