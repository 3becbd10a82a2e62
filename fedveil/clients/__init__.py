"""Client side of a federation: join a job from an existing PyTorch loop, or run a turnkey client.

- :func:`federate` — a round iterator for an existing training loop (:mod:`fedveil.clients.api`).
- :mod:`fedveil.clients.session` — the client protocol loop (join, poll, secure aggregation).
- :mod:`fedveil.clients.update` — clipping and encoding of the update (pure).
- :mod:`fedveil.clients.backoff` — exponential backoff with jitter for reconnects.
- transports (gRPC with TLS and tokens, in-process) come from :mod:`fedveil.protocol`.

The names below are imported on first use, so a light module of the package (the site policy and
its settings table, which ``fedveil``'s command line reads to build its flags) loads neither torch
nor gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedveil.lazy_exports import lazy_exports

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on first use
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

_HOMES: dict[str, str] = {
    "federate": "fedveil.clients.api", "run_client": "fedveil.clients.api", "train_round": "fedveil.clients.api",
    "AuthenticationError": "fedveil.clients.options", "ClientError": "fedveil.clients.options",
    "ClientOptions": "fedveil.clients.options", "RoundOutcome": "fedveil.clients.options",
    "Round": "fedveil.clients.round", "Federation": "fedveil.clients.session",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
