"""What every stage of the SecAgg server shares: the round's context, the stage base class, the two
end states and the result.

A module of its own so that the stages (:mod:`fedveil.secagg.server`) and the unmasking stage
(:mod:`fedveil.secagg.unmasking`) can both build on it without importing each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import UnexpectedMessageError
from fedveil.secagg.messages import AdvertiseKeys, Message, RoundAborted, UnmaskingResponse
from fedveil.secagg.session import Session
from fedveil.secagg.share_commitments import COMMITMENTS_BYTES
from fedveil.secagg.share_complaints import SIGNED_BYTES, ComplaintVerdict


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of a completed round: the ring sum of the survivors' inputs, and who they are."""

    ring_sum: np.ndarray
    survivors: tuple[int, ...]
    """Clients whose inputs are in the sum (their masked inputs arrived)."""
    dropped: tuple[int, ...]
    """Clients that shared keys but whose masked inputs did not arrive (masks removed)."""
    faulty_holders: tuple[int, ...] = ()
    """Clients whose unmasking answers were refused: they returned shares their owners had not committed
    to (none in an honest round; :attr:`ServerContext.misconduct` says why)."""


@dataclass(frozen=True)
class BoxCommitments:
    """One owner's commitments to its holders' shares, kept from the masked-input stage to unmasking:
    one ``(holders, COMMITMENTS_BYTES)`` array (16 KiB for 250 holders, no object per box)."""

    holders: np.ndarray
    """The holders, ascending."""
    commitments: np.ndarray

    @classmethod
    def of(cls, boxes: dict[int, bytes]) -> BoxCommitments:
        """From an owner's share boxes, by holder: the commitments follow each box's ciphertext."""
        holders = sorted(boxes)
        start = SIGNED_BYTES - COMMITMENTS_BYTES
        block = b"".join(boxes[h][start:SIGNED_BYTES] for h in holders)
        return cls(np.asarray(holders, dtype=np.int64),
                   np.frombuffer(block, dtype=np.uint8).reshape(len(holders), COMMITMENTS_BYTES))

    def get(self, holder: int) -> bytes | None:
        """The two commitments of the box sent to ``holder``, or None if it was sent none."""
        i = int(np.searchsorted(self.holders, holder))
        if i == len(self.holders) or int(self.holders[i]) != holder:
            return None
        return self.commitments[i].tobytes()


class ServerContext:
    def __init__(self, config: SecAggConfig, threads: int) -> None:
        self.config = config
        self.threads = threads
        self.session: Session | None = None
        self.u2: tuple[int, ...] = ()
        self.boxes: dict[int, dict[int, bytes]] = {}
        # owner → its two commitments to each holder's shares (masked-input stage to unmasking)
        self.commitments: dict[int, BoxCommitments] = {}
        # Clients proven to deviate at unmasking (fedveil.secagg.share_commitments) → why.
        self.misconduct: dict[int, str] = {}
        # Unmasking answers whose commitments a driver checked ahead of receive() and found sound.
        self.verified_unmasking: dict[int, UnmaskingResponse] = {}
        self.running_sum: np.ndarray | None = None
        self.u3: tuple[int, ...] = ()
        self.dropped: tuple[int, ...] = ()
        self.signatures: dict[int, bytes] = {}
        # Judged complaints about share boxes, by complaining holder (SecAggServer.judge_complaints).
        self.verdicts: dict[int, tuple[ComplaintVerdict, ...]] = {}
        # Advertisements whose identity signature this server verified ahead of receive().
        self.verified_adverts: set[AdvertiseKeys] = set()


class ServerState:
    """One stage of the server: ``receive`` collects, ``close`` returns ``(next_state, outgoing)``."""

    name: ClassVar[str] = "?"
    message_type: ClassVar[type[Message] | None] = None

    def __init__(self, ctx: ServerContext, expected: tuple[int, ...]) -> None:
        self.ctx = ctx
        self.expected = expected
        self._expected_set = frozenset(expected)
        self.received: dict[int, None] = {}  # insertion-ordered set of senders
        # Expected clients that left the stage without its message (a holder that complained about its
        # share boxes): nothing more is accepted from them, and at close they are dropouts like the silent.
        self.withdrawn: set[int] = set()

    def receive(self, client_id: int, msg: Message) -> None:
        if self.message_type is None or not isinstance(msg, self.message_type):
            raise UnexpectedMessageError(f"server in state {self.name} cannot accept {type(msg).__name__} "
                                         f"from client {client_id}")
        if client_id not in self._expected_set:
            raise UnexpectedMessageError(f"server in state {self.name} expects no message from client {client_id}")
        if client_id in self.received:
            raise UnexpectedMessageError(f"client {client_id} already sent its {type(msg).__name__}")
        if client_id in self.withdrawn:
            raise UnexpectedMessageError(f"client {client_id} left the {self.name} stage (it complained about its "
                                         "share boxes)")
        self._accept(client_id, msg)
        self.received[client_id] = None

    def _accept(self, client_id: int, msg: Message) -> None:
        raise NotImplementedError

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        raise UnexpectedMessageError(f"server in state {self.name} has no stage to close")

    def _abort(self, reason: str, notify: tuple[int, ...]) -> tuple[ServerState, dict[int, Message]]:
        rid = self.ctx.config.round_id
        return ServerAborted(self.ctx, reason), {c: RoundAborted(rid, c, reason) for c in notify}

    def _survivors(self, stage: str) -> tuple[int, ...] | str:
        """Senders of this stage in id order, or an abort reason when fewer than t."""
        alive = tuple(sorted(self.received))
        t = self.ctx.config.threshold
        if len(alive) < t:
            return f"only {len(alive)} clients completed the {stage} stage; threshold is {t}"
        return alive


class ServerCompleted(ServerState):
    """The round finished; :attr:`result` holds the sum."""

    name = "Completed"

    def __init__(self, ctx: ServerContext, result: AggregationResult) -> None:
        super().__init__(ctx, ())
        self.result = result


class ServerAborted(ServerState):
    """The round was aborted; nothing about any input was revealed."""

    name = "Aborted"

    def __init__(self, ctx: ServerContext, reason: str) -> None:
        super().__init__(ctx, ())
        self.reason = reason
