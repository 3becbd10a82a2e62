"""The fedveil wire protocol: versioned protobuf messages over gRPC, with TLS, auth and limits.

``fedveil.proto`` (package ``fedveil.v3``, ``PROTOCOL_VERSION = 3``) defines one service,
``Federation``. The generated modules ``fedveil_pb2`` / ``fedveil_pb2_grpc`` are committed
(regenerate with ``make proto``). The protobuf message objects are also the *decoded* messages
the transport-independent coordinator (``fedveil.server.coordinator``) takes and returns, so
the in-process simulation passes the same objects without serializing them; the gRPC servicer
(:mod:`fedveil.protocol.service`) is a thin adapter that parses bytes, authenticates, calls the
coordinator and turns its exceptions into status codes. Transports carry messages; they never
carry protocol logic.

RPC flow (one client)
---------------------
1. ``Join(JoinRequest)`` → ``JoinResponse``: credentials are checked (bearer token in the
   ``authorization: Bearer <token>`` metadata, issued by ``fedveil enroll``; or a mutual-TLS
   client certificate whose common name is an enrolled client), then the protocol version and
   the task name. The response carries a fresh 16-byte ``session_id`` and the ``run_id``. A new
   Join replaces the client's previous session (an old process of the same client is refused);
   if the client was mid-round, it is counted as a dropout of that round.
2. Every later request carries a ``RequestHeader``: ``protocol_version``, ``session_id``,
   ``run_id``, ``round`` and ``round_nonce`` (from ``RoundStart``; empty/0 when not in a
   round) and a ``sequence`` number that strictly increases per session (1, 2, 3, ...). Send
   one request at a time per session.
3. ``Poll(PollRequest)`` → ``PollResponse`` is a long poll ("what next?"). It returns at once
   when an instruction is pending, otherwise after ``max_wait_ms`` (capped by the server) with
   ``Wait``. It is idempotent: polling again before acting returns the same instruction, so a
   lost reply costs nothing. Instructions, in the order a round produces them:

   - ``RoundStart``: the client is in round ``round``'s cohort with secagg id ``client_id``
     (0 .. n-1, as in ``fedveil.secagg``; ``secagg.round_id`` is the secagg round id).
     Carries the global ``Model`` (float32 little-endian, ``state_dict`` order, see
     ``fedveil.task.model_to_vector``), ``EncodingParams`` (ring bits, clip range, fixed-point
     bits, vector dimension and the extra coordinates appended after the update, e.g.
     ``weight``), ``SecAggParams`` (graph, degree, threshold t, cohort, secagg round id,
     context, the collusion fraction f that t was chosen for (2t > h + c), and in
     active-adversary mode every member's Ed25519 identity key),
     ``DpParams``, ``TrainingParams`` and ``deadline_unix_ms``. If
     ``training.evaluate_global_model`` the client evaluates the received model on its data
     and sends ``ReportMetrics`` (model_version = model.version). It trains, then calls
     ``AdvertiseKeys`` (two X25519 public keys, 32 raw bytes each) before the deadline.
     Over gRPC the model comes without its bytes (``size_bytes`` and ``sha256`` set): fetch
     them with ``FetchModel(version)``, a server stream of ``ModelChunk`` sliced from one shared
     buffer (``GrpcTransport.poll`` does this transparently).
   - ``PeerKeys``: the advertised keys of every client in U1 (including the caller). The
     client computes the session id and calls ``ShareKeys`` with one AES-GCM ciphertext of
     Shamir shares per neighbour (``peer_id`` = recipient).
   - ``IncomingShares``: the ciphertexts addressed to this client (``peer_id`` = sender) from
     U2. The client encodes its (clipped, possibly noised) update, masks it and calls
     ``SubmitMaskedInput`` with ``dimension`` ring elements as raw little-endian uint32
     (``ring_bits`` <= 32) or uint64 bytes. A large input goes as a client stream,
     ``UploadMaskedInput`` (``MaskedInputChunk``: header and ``total_bytes`` in the first chunk,
     then the bytes in order; ``GrpcTransport`` switches above 64 KiB and sends 1 MiB chunks).
     Admission: the client sends the first chunk without data and waits; the server grants an
     upload slot (at most two at a time) by sending the initial metadata
     ``fedveil-upload-slot: granted``, and only then does the client send its bytes. So a queued
     uploader costs the server a stream and a thread, not a vector in its HTTP/2 receive window,
     and its memory stays O(m) + O(n) however many clients upload at once. A server that does
     not grant slots (older than this rule) is not supported by these clients: their upload
     would wait until its deadline. A client that cannot open a neighbour's box calls
     ``ComplainAboutShares`` instead, with the evidence of each failure (the pair's X25519 point
     and a DLEQ proof that it is the pair's, or, in active mode, a box whose sender's signature
     fails); the server judges each complaint and leaves whoever it proves at fault out of the
     rest of the job (``fedveil.server.coordinator.misconduct``). One upload per site and
     stage (``fedveil.protocol.uploads``):
     the header chunk reserves the stage's upload and spends its sequence number, so a second
     stream with the same or another header for that stage gets ALREADY_EXISTS at once (so does a
     site with two upload streams open already); a stream that broke releases the reservation
     and the site may retry with a new header (at most 3 uploads per stage). Slots are granted in
     arrival order; a stream that sends no chunk for ``upload_idle_timeout_s`` (or holds its slot
     past its bound) is cancelled (CANCELLED); when too many uploads wait already, UNAVAILABLE.
   - ``SurvivorCheck`` (active-adversary mode only): U3; the client signs it and calls
     ``ConfirmSurvivors``.
   - ``UnmaskingRequest``: ``survivors`` (U3) and ``dropped`` (U2 \\ U3). The client calls
     ``Unmask`` with its share of each surviving neighbour's self-mask seed and of each dropped
     neighbour's masking key; the secagg client refuses a request that would reveal both for
     one peer.
   - ``RoundResult``: how the round ended for this client (completed, aborted, or dropped).
   - ``Evaluate``: after the last round, the final model to evaluate; answer with
     ``ReportMetrics`` (header.round = ``Evaluate.phase``, header.round_nonce = its nonce).
   - ``JobDone``: the job finished; the client exits 0.
   - ``Wait``: nothing for this client yet (no cohort yet, or a round runs without it).

   A held poll that the client abandons (its process or connection gone) marks the client
   disconnected: it is not chosen for cohorts until it sends another request.

Deadlines and dropouts
----------------------
The training stage ends at ``RoundStart.deadline_unix_ms`` (``--round-timeout``); every later
stage closes ``stage_timeout_ms`` (``--stage-timeout``) after it opens, or as soon as every
live participant has answered. A client that misses a stage is a dropout: the round goes on
without it while at least t clients remain (its later messages get ``ABORTED``, and its next
``Poll`` returns ``RoundResult`` with outcome DROPPED); below t the round aborts, reveals
nothing, and the cohort gets ``RoundResult`` with outcome ABORTED. Aborted rounds are retried
with a fresh cohort and nonce.

Status codes
------------
- ``UNAUTHENTICATED``: missing, unknown or revoked credentials. Fatal: do not retry.
- ``PERMISSION_DENIED``: authenticated, but the request is not this client's to make (e.g.
  it is not in the round's cohort, or its Join announces an identity key other than the enrolled
  one). Poll again.
- ``INVALID_ARGUMENT``: malformed input: bytes that do not parse, a field of the wrong length
  or value (the message names the field), a vector of the wrong size, an unknown peer id.
- ``RESOURCE_EXHAUSTED``: the message exceeds the server's size limit
  (``JoinResponse.max_message_bytes``), or the server has too many calls in flight.
- ``FAILED_PRECONDITION``: at ``Join``, an incompatible protocol version or task, or no identity
  key for an active-adversary job (fatal). On
  other RPCs, the client is out of sync: unknown/replaced session, another run, a stale round
  or nonce, or a message for a stage that is not open for it (out of order). Join again.
- ``ALREADY_EXISTS``: a replayed message (sequence number not above the last one seen) or a
  second submission for a stage (a second upload stream for a stage included). Do not resend; Poll.
- ``ABORTED``: the stage closed before the message arrived, or the round was aborted; the
  client is a dropout of that round. Poll for the next instruction.
- ``UNAVAILABLE``: the server is starting or shutting down (or unreachable): retry with backoff.
- ``INTERNAL``: a server bug (logged server-side).

Every refusal is logged server-side with the client name, RPC and reason, never with tokens,
keys, shares or vectors.
"""

from __future__ import annotations

PROTOCOL_VERSION = 3
"""Bumped only for incompatible changes; see the compatibility rule in ``fedveil.proto``."""

SERVICE_NAME = "fedveil.v3.Federation"
AUTH_METADATA_KEY = "authorization"
UPLOAD_GRANT_METADATA = "fedveil-upload-slot"
"""Initial-metadata key the server sends on ``UploadMaskedInput`` once the upload holds a slot."""
SESSION_ID_BYTES = 16
ROUND_NONCE_BYTES = 16

__all__ = [
    "AUTH_METADATA_KEY", "PROTOCOL_VERSION", "ROUND_NONCE_BYTES", "SERVICE_NAME", "SESSION_ID_BYTES",
    "UPLOAD_GRANT_METADATA",
]
