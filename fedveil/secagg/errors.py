"""Named failures of the secure-aggregation engine.

Every failure is a specific exception (in the spirit of pyca/cryptography's ``InvalidTag`` and
``InvalidSignature``), never a bare boolean, so that a driver can tell a misbehaving peer from a
bad configuration from a round that simply lost too many clients.
"""

from __future__ import annotations


class SecAggError(Exception):
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
