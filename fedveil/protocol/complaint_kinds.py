"""The wire names of share-box complaints (``ShareComplaintKind``) and the secagg names they carry.

Both sides translate with this one table: the site's driver when it sends the complaints its
masked-input stage raised, the coordinator when it hands them to the judge
(:mod:`fedveil.secagg.share_complaints`).
"""

from __future__ import annotations

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.share_complaints import BAD_KEY, BAD_SIGNATURE, UNDECRYPTABLE

SHARE_COMPLAINT_KINDS: dict[int, str] = {
    pb.SHARE_COMPLAINT_KIND_UNDECRYPTABLE: UNDECRYPTABLE,
    pb.SHARE_COMPLAINT_KIND_BAD_SIGNATURE: BAD_SIGNATURE,
    pb.SHARE_COMPLAINT_KIND_BAD_KEY: BAD_KEY,
}
"""Wire kind → secagg complaint kind."""

WIRE_COMPLAINT_KINDS: dict[str, int] = {name: wire for wire, name in SHARE_COMPLAINT_KINDS.items()}
"""Secagg complaint kind → wire kind."""
