"""A site's client-side settings and what it learns of each round's end (the loop's vocabulary)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from fedveil.clients.backoff import BackoffPolicy
from fedveil.clients.policy import SitePolicy
from fedveil.errors import FedveilError
from fedveil.secagg.signature_memo import SignatureMemo

EvaluateFn = Callable[[nn.Module], dict[str, float]]


class ClientError(FedveilError, RuntimeError):
    """The client cannot continue (refused credentials, incompatible job, bad local set-up)."""


class AuthenticationError(ClientError):
    """The server refused this client's credentials (``UNAUTHENTICATED``)."""


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended for this client."""

    round: int
    outcome: str  # "completed", "aborted", "dropped" or "declined" (sat out by the client's choice)
    reason: str = ""
    survivors: int = 0
    new_model_version: int = 0
    update_norm: float = 0.0
    clipped: bool = False


@dataclass
class ClientOptions:
    """Client-side settings.

    ``seed`` fixes the site's data order (shuffling, per round and attempt); left as None, a random
    one is drawn. Keys, masks, rounding and DP noise always come from the OS CSPRNG, fresh every
    attempt, unless ``insecure_deterministic`` (tests and bit-for-bit simulations only: the server
    could then predict them from a seed it knows).

    ``policy`` is the site's security policy (default: :class:`SitePolicy`'s malicious-server
    defaults, which need the consortium authority's key); ``credential`` the site's credential from
    that authority; ``state_path`` where the site keeps its attempts, releases and own privacy
    ledger across restarts (default: in memory).
    """

    seed: int | bytes | None = None
    num_examples: int = 0
    poll_wait_ms: int = 5_000
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    evaluate: EvaluateFn | None = None
    identity_key: Ed25519PrivateKey | None = None
    """Ed25519 identity key for active-adversary jobs (announced at Join, or enrolled)."""
    weight: float | None = None
    """This client's weight when the server aggregates a weighted mean; default: the number of
    examples the loop passes to :meth:`Round.submit` (capped at the server's ``max_weight``)."""
    policy: SitePolicy | None = None
    credential: bytes = b""
    state_path: Path | None = None
    revocations_path: Path | None = None
    """The authority's revocation list file the policy's list came from: read again whenever it
    changes, before each round's cohort check (a replaced file takes effect without a restart)."""
    insecure_deterministic: bool = False
    privacy_engine: Any = None
    """The site's own ``opacus.PrivacyEngine`` after its ``make_private[_with_epsilon]`` call: the site
    keeps its Opacus code, fedveil reads its ε from the engine's accountant."""
    verified_credentials: set[bytes] | None = None
    """Where the site records the peer credentials whose authority signature it has checked
    (default: a set of its own). A simulation passes one set to all the sites a process hosts, so
    each credential is checked and kept once per process, not once per site: with thousands of
    enrolled sites, per-site sets held one mark per enrolled peer in every site. A mark names the
    credential's exact bytes and the authority's key, so a shared set never vouches for a
    credential under another authority."""
    signature_memo: SignatureMemo | None = None
    """Ed25519 verdicts shared with the other sites of this process (:mod:`fedveil.secagg.signature_memo`):
    a simulation passes one memo to all the sites a process hosts, so each public signature of a round
    is verified once per process, not once per site. Default: none, every signature verified here."""

    def private_seed(self) -> bytes:
        if self.seed is None:
            return os.urandom(32)
        if isinstance(self.seed, bytes):
            if len(self.seed) < 16:
                raise ValueError(f"seed: at least 16 bytes (got {len(self.seed)})")
            return self.seed
        if self.seed < 0:
            raise ValueError(f"seed: must be non-negative (got {self.seed})")
        return self.seed.to_bytes(32, "little")
