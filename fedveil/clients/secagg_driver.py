"""Glue between the wire messages (``fedveil.protocol``) and the pure secagg client state machine.

The state machine (:class:`fedveil.secagg.client.SecAggClient`) holds all protocol logic: key
generation, Shamir sharing, share encryption, masking, and the refusal of dangerous unmasking
requests. This driver only translates protobuf instructions into secagg messages and the
replies back, so the same client code runs over gRPC and in-process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.clients.shared_round_views import advertisements_of, shared_value
from fedveil.errors import FedveilError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import encode_ring_vector
from fedveil.protocol.complaint_kinds import WIRE_COMPLAINT_KINDS
from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import ShareComplaintsError
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.messages import (
    ConsistencyCheckRequest,
    ConsistencyCheckResponse,
    MaskedInputRequest,
    MaskedInputResponse,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
)
from fedveil.secagg.signature_memo import SignatureMemo


class UnsupportedRoundError(FedveilError, ValueError):
    """The round asks for something this client does not support; the message names it."""


def secagg_config(start: pb.RoundStart, graph_seed: bytes = b"") -> SecAggConfig:
    """The round's :class:`SecAggConfig`, built from ``RoundStart`` exactly as the server builds it.

    Every field enters the session id, so a difference here means no shared session: the
    graph's degree counts only for Harary graphs (0 for the complete graph). The collusion
    fraction f is the server's (``SecAggConfig`` refuses t unless 2t > h + c for it); a site has
    no policy of its own for f yet.
    """
    params = start.secagg
    kind = params.graph or "complete"
    active = bool(params.active_adversary)
    return SecAggConfig(
        num_clients=int(params.cohort_size),
        threshold=int(params.threshold),
        vector_length=int(start.encoding.dimension),
        round_id=int(params.round_id),
        ring_bits=int(start.encoding.ring_bits),
        graph=GraphSpec(kind, int(params.degree) if kind == "harary" else 0),
        active=active,
        identity_keys=shared_value(tuple(bytes(k) for k in params.identity_keys)) if active else None,
        context=bytes(params.context),
        max_corrupt_fraction=float(params.max_corrupt_fraction),
        graph_seed=graph_seed,
    )


class SecAggClientDriver:
    """One round of the secagg client, fed with protobuf instructions."""

    def __init__(
        self, start: pb.RoundStart, *, seed: bytes | None = None, identity_key: Ed25519PrivateKey | None = None,
        graph_seed: bytes = b"", signature_memo: SignatureMemo | None = None,
    ) -> None:
        if start.secagg.active_adversary and identity_key is None:
            raise UnsupportedRoundError(
                "secagg.active_adversary: the job runs in active-adversary mode and this client has no "
                "Ed25519 identity key (federate(identity_key=...), fedveil client --identity-key)"
            )
        self.config = secagg_config(start, graph_seed)
        self.client_id = int(start.client_id)
        self.client = SecAggClient(
            self.client_id, self.config, seed=seed, identity_key=identity_key if self.config.active else None,
            signature_memo=signature_memo,
        )

    @property
    def round_id(self) -> int:
        return self.config.round_id

    def set_input(self, ring_vector: np.ndarray) -> None:
        self.client.set_input(ring_vector)

    def advertise(self) -> dict[str, Any]:
        adv = self.client.advertise_keys()
        return {
            "encryption_public_key": adv.share_public,
            "masking_public_key": adv.mask_public,
            "signature": adv.signature,
            "share_key_proof": adv.share_proof,
        }

    def share_keys(self, peer_keys: pb.PeerKeys) -> list[pb.EncryptedShare]:
        advertisements = advertisements_of(peer_keys.SerializeToString(), self.round_id)
        reply = self.client.handle(ShareKeysRequest(self.round_id, self.client_id, advertisements))
        assert isinstance(reply, ShareKeysResponse)
        return [pb.EncryptedShare(peer_id=holder, ciphertext=box) for holder, box in sorted(reply.boxes.items())]

    def masked_input(self, incoming: pb.IncomingShares) -> bytes:
        boxes: dict[int, bytes] = {}
        for item in incoming.shares:
            boxes[int(item.peer_id)] = bytes(item.ciphertext)
        reply = self.client.handle(MaskedInputRequest(self.round_id, self.client_id, boxes))
        assert isinstance(reply, MaskedInputResponse)
        return encode_ring_vector(reply.vector, self.config.ring_bits)

    @staticmethod
    def complaints(error: ShareComplaintsError) -> list[pb.ShareComplaint]:
        """The wire form of the complaints a failed masked-input stage raised (sent instead of the
        masked input, so the server can tell who is at fault: :mod:`fedveil.secagg.share_complaints`)."""
        return [pb.ShareComplaint(sender_id=c.sender, kind=WIRE_COMPLAINT_KINDS[c.kind],  # type: ignore[arg-type]
                                  shared_point=c.shared_point, proof=c.proof) for c in error.complaints]

    def unmask(self, request: pb.UnmaskingRequest) -> list[pb.RevealedShare]:
        message = UnmaskingRequest(
            self.round_id,
            self.client_id,
            np.asarray(list(request.survivors), dtype=np.uint32),
            np.asarray(list(request.dropped), dtype=np.uint32),
            {int(s.client_id): bytes(s.signature) for s in request.signatures},
        )
        reply = self.client.handle(message)
        assert isinstance(reply, UnmaskingResponse)
        return (_revealed(pb.SHARE_KIND_SELF_MASK_SEED, reply.self_mask_owners, reply.self_mask_shares,
                          reply.self_mask_salts)
                + _revealed(pb.SHARE_KIND_MASKING_KEY, reply.mask_key_owners, reply.mask_key_shares,
                            reply.mask_key_salts))

    def confirm_survivors(self, check: pb.SurvivorCheck) -> bytes:
        """Active mode: sign the announced survivor set (the state machine checks it first)."""
        request = ConsistencyCheckRequest(
            self.round_id, self.client_id, np.asarray(list(check.survivors), dtype=np.uint32)
        )
        reply = self.client.handle(request)
        assert isinstance(reply, ConsistencyCheckResponse)
        return reply.signature


def _revealed(kind: pb.ShareKind, owners: np.ndarray, shares: np.ndarray, salts: np.ndarray) -> list[pb.RevealedShare]:
    """One RevealedShare per owner, with the salt of its commitment; each matrix is encoded once and
    sliced per row."""
    raw = np.ascontiguousarray(shares, dtype="<u4").tobytes()
    width = 4 * shares.shape[1]  # an (owners, limbs) matrix, as the state machine builds it
    raw_salts = np.ascontiguousarray(salts, dtype=np.uint8).tobytes()
    step = salts.shape[1]
    return [pb.RevealedShare(owner_id=owner, kind=kind, share=raw[i * width : (i + 1) * width],
                             salt=raw_salts[i * step : (i + 1) * step])
            for i, owner in enumerate(owners.tolist())]
