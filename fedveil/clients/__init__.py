"""Client side of a federation: join a job from an existing PyTorch loop, or run a turnkey client.

- :func:`federate` — a round iterator for an existing training loop (:mod:`fedveil.clients.api`).
- :mod:`fedveil.clients.session` — the client protocol loop (join, poll, secure aggregation).
- :mod:`fedveil.clients.update` — clipping and encoding of the update (pure).
- :mod:`fedveil.clients.backoff` — exponential backoff with jitter for reconnects.
- transports (gRPC with TLS and tokens, in-process) come from :mod:`fedveil.protocol`.
"""

from fedveil.clients.api import federate, run_client, train_round
from fedveil.clients.options import AuthenticationError, ClientError, ClientOptions, RoundOutcome
from fedveil.clients.round import Round
from fedveil.clients.session import Federation

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ClientOptions",
    "Federation",
    "Round",
    "RoundOutcome",
    "federate",
    "run_client",
    "train_round",
]
