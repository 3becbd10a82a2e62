"""Secure aggregation (SecAgg, Bonawitz et al. CCS 2017; SecAgg+, Bell et al. CCS 2020).

The server learns the sum of the surviving clients' vectors and nothing else, even when clients
drop out at any stage, as long as at least ``threshold`` remain. This package is pure: no I/O,
no global state; transports move its messages and never carry protocol logic.

Modules: :mod:`~.encoding` (float → fixed point → Z_2^k and back), :mod:`~.prg` (AES-CTR mask
expansion), :mod:`~.keys` (X25519, HKDF, session id, Ed25519), :mod:`~.shamir` (vectorized
Shamir, AES-GCM share boxes), :mod:`~.graph` (complete / Harary graphs), :mod:`~.threshold`
(the collusion rule 2t > h + c and the choice of graph degree and t),
:mod:`~.messages` (wire messages), :mod:`~.share_complaints` (verifiable complaints about share
boxes that do not open, so the server can blame their sender), :mod:`~.share_commitments` (each
box's commitments to its shares, so that a holder returning another share or an owner dealing
shares that do not reconstruct is proven at fault), :mod:`~.client` and :mod:`~.server` (state machines, one
class per stage; the server's shared states in :mod:`~.server_states`, its unmasking stage in
:mod:`~.unmasking`), :mod:`~.simulation` (in-process round runner), :mod:`~.identity` (site
credentials: an authority that is not the server vouches for each identity key; their binary
format in :mod:`~.identity_encoding`) and :mod:`~.local_authority` (that authority in memory,
for simulations).

How a driver runs one round
---------------------------
Every party builds the same :class:`SecAggConfig`; client ids are ``0 .. n-1``::

    plan = plan_threshold(n, "harary")                            # k, t with 2t > h + c (f = 1/3)
    config = SecAggConfig(num_clients=n, threshold=plan.threshold, vector_length=m, round_id=r,
                          graph=plan.spec)                        # GraphSpec("harary", k) or complete
    encoder = FixedPointEncoder.for_clients(n, clip=1.0)          # if inputs are floats

    # client side
    client = SecAggClient(client_id, config)                     # identity_key=... in active mode
    client.set_input(encoder.encode(update, seed=os.urandom(16))) # or a ring vector (distributed DP)
    send(client.advertise_keys())                                 # R0
    for each server message msg:                                  # ShareKeysRequest, MaskedInputRequest, ...
        reply = client.handle(msg)                                # accepts a Message or its bytes
        if reply is not None: send(reply)
    # client.completed / client.aborted / client.abort_reason tell how it ended.

    # server side
    server = SecAggServer(config)
    while not (server.completed or server.aborted):
        for each (client_id, msg) arriving before the stage deadline:
            server.receive(client_id, msg)                        # client_id as authenticated by the transport
            if not server.pending: break                          # everyone answered: close early
        for client_id, out in server.close_stage().items():       # late clients are now dropouts
            send_to(client_id, out)
    ring_sum = server.result.ring_sum                             # survivors: server.result.survivors
    mean = encoder.decode_mean(ring_sum, len(server.result.survivors))

Wire format: ``msg.to_bytes()`` and :func:`decode_message` (raw little-endian ring elements,
no pickle); ``msg.wire_size()`` is the exact byte count. ``server.expected`` lists the clients
awaited in the current stage. Errors a peer can provoke (:class:`UnexpectedMessageError`,
:class:`WrongRoundError`, :class:`MalformedMessageError`, …) are raised by ``receive`` /
``handle`` and leave the state unchanged; a client that detects an attack or must refuse a
request raises and moves to its Aborted state. A server abort sends :class:`RoundAborted` to
every client still in the round. A client that cannot open a share box raises
:class:`ShareComplaintsError`; the driver hands ``err.complaints`` to the server's
:meth:`SecAggServer.judge_complaints` (masked-input stage), whose verdicts name the sender or the
holder proven at fault (``server.blamed``), so a driver can leave it out of the next attempt.
"""

from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.encoding import FixedPointEncoder, Ring
from fedveil.secagg.errors import (
    ConfigError,
    ConsistencyCheckError,
    DoubleShareRequestError,
    EncodingOverflowError,
    InvalidSignatureError,
    MalformedMessageError,
    ProtocolError,
    RoundAbortedError,
    SecAggError,
    ShareComplaintsError,
    ShareDecryptionError,
    TooFewSurvivorsError,
    UnexpectedMessageError,
    UnmaskingRefusedError,
    WrongRoundError,
)
from fedveil.secagg.graph import CompleteGraph, GraphSpec, HararyGraph
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    ConsistencyCheckResponse,
    MaskedInputRequest,
    MaskedInputResponse,
    Message,
    RoundAborted,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
    decode_message,
)
from fedveil.secagg.server import AggregationResult, SecAggServer
from fedveil.secagg.share_complaints import ComplaintVerdict, ShareComplaint
from fedveil.secagg.simulation import SimulationResult, run_round
from fedveil.secagg.threshold import ThresholdPlan, collusion_bound, min_threshold, plan_threshold, satisfies

__all__ = [
    "AdvertiseKeys",
    "AggregationResult",
    "ComplaintVerdict",
    "CompleteGraph",
    "ConfigError",
    "ConsistencyCheckError",
    "ConsistencyCheckRequest",
    "ConsistencyCheckResponse",
    "DoubleShareRequestError",
    "EncodingOverflowError",
    "FixedPointEncoder",
    "GraphSpec",
    "HararyGraph",
    "InvalidSignatureError",
    "MalformedMessageError",
    "MaskedInputRequest",
    "MaskedInputResponse",
    "Message",
    "ProtocolError",
    "Ring",
    "RoundAborted",
    "RoundAbortedError",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "ShareComplaint",
    "ShareComplaintsError",
    "ShareDecryptionError",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "SimulationResult",
    "ThresholdPlan",
    "TooFewSurvivorsError",
    "UnexpectedMessageError",
    "UnmaskingRefusedError",
    "UnmaskingRequest",
    "UnmaskingResponse",
    "WrongRoundError",
    "collusion_bound",
    "decode_message",
    "min_threshold",
    "plan_threshold",
    "run_round",
    "satisfies",
]
