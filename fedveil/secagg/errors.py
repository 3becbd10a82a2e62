"""Named failures of the secure-aggregation engine.

Every failure is a specific exception (in the spirit of pyca/cryptography's ``InvalidTag`` and
``InvalidSignature``), never a bare boolean, so that a driver can tell a misbehaving peer from a
bad configuration from a round that simply lost too many clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedveil.errors import FedveilError

if TYPE_CHECKING:
    from fedveil.secagg.share_complaints import ShareComplaint


class SecAggError(FedveilError):
    """Base class of every error raised by :mod:`fedveil.secagg`."""


class ConfigError(SecAggError, ValueError):
    """A configuration value is invalid; the message names the parameter and the value."""


class EncodingOverflowError(ConfigError):
    """The sum of the configured number of clients could wrap around the ring."""


class ProtocolError(SecAggError):
    """A message violates the protocol (wrong stage, wrong round, wrong sender, malformed)."""


class UnexpectedMessageError(ProtocolError):
    """A message that does not belong to the current state of a state machine."""


class WrongRoundError(ProtocolError):
    """A message carries another round's id or session id (for example a replay)."""


class MalformedMessageError(ProtocolError):
    """Bytes or fields that do not decode to a valid message."""


class ShareDecryptionError(ProtocolError):
    """An encrypted Shamir share failed AES-GCM authentication (tampered, misrouted or replayed)."""


class ShareComplaintsError(ShareDecryptionError):
    """Share boxes addressed to this client did not open; ``complaints`` holds one
    :class:`~fedveil.secagg.share_complaints.ShareComplaint` per failing sender, the evidence a driver
    hands the server (:meth:`~fedveil.secagg.server.SecAggServer.judge_complaints`) so it can tell
    who is at fault. The client has aborted the attempt (it sends no masked input)."""

    def __init__(self, message: str, complaints: Iterable[ShareComplaint] = ()) -> None:
        super().__init__(message)
        self.complaints: tuple[ShareComplaint, ...] = tuple(complaints)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.complaints)


class InvalidSignatureError(ProtocolError):
    """Active-adversary mode: a signature over advertised keys or the survivor set did not verify."""


class ConsistencyCheckError(InvalidSignatureError):
    """Active-adversary mode: clients were shown different survivor sets."""


class UnmaskingRefusedError(SecAggError):
    """A client refuses an unmasking request because answering it could reveal an input."""


class DoubleShareRequestError(UnmaskingRefusedError):
    """The request asks for both the self-mask share and the masking-key share of one peer."""


class TooFewSurvivorsError(UnmaskingRefusedError):
    """The announced survivor set is smaller than the threshold."""


class RoundAbortedError(SecAggError):
    """The round was aborted (too few clients remained); nothing about any input was revealed."""


class IdentityError(SecAggError):
    """A site credential, a revocation list or a roster of credentials is not acceptable.

    ``field`` names the part at fault (``"not_after"``, ``"credentials[2].site_name"``, ...);
    ``index`` is the position in a roster, when the error came from :func:`verify_roster`.
    """

    def __init__(self, field: str, message: str, *, index: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message
        self.index = index


class CredentialError(IdentityError):
    """Base of every failure about a credential or a revocation list (see :mod:`~.identity`)."""


class MalformedCredentialError(CredentialError, ValueError):
    """Bytes or a field value that do not form a valid credential or revocation list."""


class InvalidCredentialSignature(CredentialError):
    """The authority's signature does not verify under the pinned authority key (forged, or
    issued by another authority, e.g. one the aggregation server made itself)."""


class CredentialNotYetValid(CredentialError):
    """``now`` is before the credential's ``not_before``."""


class CredentialExpired(CredentialError):
    """``now`` is at or after the credential's ``not_after``."""


class CredentialRevoked(CredentialError):
    """The credential's serial is on the authority's revocation list."""


class WrongConsortium(CredentialError):
    """The credential or revocation list belongs to another consortium."""


class CredentialMismatch(CredentialError):
    """The credential vouches for another site name or another identity key than expected."""


class InvalidRevocationList(CredentialError):
    """A revocation list whose signature does not verify under the pinned authority key."""


class RevocationListConflict(InvalidRevocationList):
    """Two authentic revocation lists carry the same version but different contents."""


class DuplicateRosterEntry(CredentialError):
    """A roster gives one site name two slots, or one identity key two names."""


class InvalidSignedRoster(CredentialError):
    """A signed roster whose signature does not verify under the pinned authority key, or that
    lists a credential its authority did not issue (:mod:`~.signed_roster`)."""
