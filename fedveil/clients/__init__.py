"""Client side of a federation: join a job from an existing PyTorch loop, or run a turnkey client.

- :func:`fedveil.clients.federate` — a round iterator for an existing training loop.
- :mod:`fedveil.clients.backoff` — exponential backoff with jitter for reconnects.
- :mod:`fedveil.clients.transport` — gRPC (TLS, token) and in-process transports.
"""
