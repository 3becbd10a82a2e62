"""One site's part in one round attempt, after the loop hands back its trained model.

:class:`Federation` (``fedveil.clients.session``) polls the server and talks to the user's loop;
this module is what happens to a round in between: the admission check against the site's
policy, the commit-then-reveal of the graph seed, and — once the loop has trained — encoding the
update (with this attempt's fresh randomness and, in distributed DP, the site's own noise share),
appending the evaluation sums, and the secure-aggregation stages. Every masked input sent is a
release in the site's own ledger; every unmasking answer marks the round as released, so no later
attempt of it is ever joined.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedveil.clients.admission import Admission, admit_round
from fedveil.clients.policy import PolicyViolation
from fedveil.clients.secagg_driver import SecAggClientDriver, UnsupportedRoundError, shared_value
from fedveil.clients.site_state import Release
from fedveil.clients.update import AttemptRandomness, PreparedUpdate, attempt_randomness, evaluation_layout
from fedveil.errors import FedveilError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg import beacon
from fedveil.secagg.errors import SecAggError, ShareComplaintsError

if TYPE_CHECKING:
    from fedveil.clients.session import Federation

log = logging.getLogger("fedveil.client")

OUTCOME_NAMES = {
    pb.ROUND_OUTCOME_COMPLETED: "completed",
    pb.ROUND_OUTCOME_ABORTED: "aborted",
    pb.ROUND_OUTCOME_DROPPED: "dropped",
}


class RoundLost(FedveilError):
    """This client is no longer part of the current round (a stage closed, or it re-joined)."""


class RoundEnded(RoundLost):
    """The server announced the round's end (e.g. an abort) before this client finished it."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(f"{outcome}: {reason}" if reason else outcome)
        self.outcome = outcome
        self.reason = reason


def admit(federation: Federation, start: pb.RoundStart, model_digest: bytes) -> Admission:
    """The policy check of ``start``, whose model the site names ``model_digest`` (raises
    :class:`PolicyViolation`)."""
    assert federation.job is not None and federation.run_id is not None
    key = federation.options.identity_key
    own_key = key.public_key().public_bytes_raw() if key is not None else b""
    return admit_round(federation.policy, federation.job, start, run_id=federation.run_id,
                       own_name=federation.client_name, own_key=own_key, now=int(time.time()),
                       state=federation.state, model_digest=model_digest,
                       verified=federation.verified_credentials)


def kept_start(start: pb.RoundStart) -> pb.RoundStart:
    """``start`` as an admitted site keeps it for the round: without the cohort's n credentials.

    Only admission reads them, and the received message (with the poll response around it) would
    otherwise hold them for the whole round in every site: a few hundred bytes per cohort member,
    per site, which at thousands of sites per round was a large share of a simulation worker's
    memory. The received message is left as it was (an in-process transport may share it with the
    server); the kept one is parsed afresh, so it holds no memory of the received one.
    """
    if not len(start.secagg.identity_credentials):
        return start
    copy = pb.RoundStart.FromString(start.SerializeToString())
    copy.secagg.ClearField("identity_credentials")
    return pb.RoundStart.FromString(copy.SerializeToString())


def agree_graph_seed(federation: Federation, start: pb.RoundStart,
                     randomness: AttemptRandomness) -> tuple[bytes, frozenset[int]]:
    """Accept the round with a commitment, reveal once every commitment is fixed, derive the seed.

    Returns the seed and ``U0``, the members that committed (only they may advertise keys).
    Raises :class:`RoundLost` when the attempt ends or the beacon is broken (a missing or false
    reveal aborts the attempt: the server must not get to choose among seeds).
    """
    round_id, me = int(start.secagg.round_id), int(start.client_id)
    mine = beacon.commitment(round_id, me, randomness.beacon)
    weight = declared_weight(federation, start)
    federation._send("RespondToRound", lambda h: federation.transport.respond_to_round(
        pb.RoundResponse(header=h, accept=True, commitment=mine, weight=weight)))
    listed = _wait_for(federation, "commitments", int(start.round)).commitments
    commitments = {int(c.client_id): bytes(c.commitment) for c in listed.commitments}
    listed_twice = len(commitments) != len(listed.commitments)
    del listed  # not held while waiting for the reveals
    try:
        if listed_twice:
            raise beacon.BeaconError("commitment list: a client is listed twice")
        beacon.check_commitments(commitments, own_id=me, own_commitment=mine,
                                 num_clients=int(start.secagg.cohort_size))
    except SecAggError as err:
        raise RoundLost(f"graph seed: {err}") from None
    federation._send("RevealContribution", lambda h: federation.transport.reveal_contribution(
        pb.RevealRequest(header=h, contribution=randomness.beacon)))
    revealed = _wait_for(federation, "contributions", int(start.round)).contributions
    reveals = {int(r.client_id): bytes(r.contribution) for r in revealed.reveals}
    try:
        return beacon.combine(round_id, commitments, reveals), shared_value(frozenset(commitments))
    except SecAggError as err:
        raise RoundLost(f"graph seed: {err}") from None


def declared_weight(federation: Federation, start: pb.RoundStart) -> float:
    """This site's weight in a weighted round, declared in the clear when it accepts (0 otherwise):
    its ``weight`` option, else its number of examples, kept inside [1, max_weight]."""
    if not start.encoding.weighted:
        return 0.0
    options = federation.options
    chosen = options.weight if options.weight is not None else float(max(options.num_examples, 1))
    return float(min(max(chosen, 1.0), float(start.encoding.max_weight)))


def _wait_for(federation: Federation, kind: str, round_number: int) -> pb.PollResponse:
    """The next instruction, which must be ``kind``; a round result or a new instruction ends the attempt."""
    while True:
        instruction = federation._next_instruction()
        got = instruction.WhichOneof("instruction")
        if got == kind:
            return instruction
        if got == "round_result":
            result = instruction.round_result
            if int(result.round) != round_number:
                continue
            raise RoundEnded(OUTCOME_NAMES.get(result.outcome, "unknown"), result.reason)
        if got in ("round_start", "evaluate", "job_done"):
            federation._pending = instruction
            raise RoundLost(f"the server moved on ({got}) before round {round_number} finished for this client")
        log.debug("ignoring a stale %s instruction while waiting for %s", got, kind)


def evaluation_section(start: pb.RoundStart, metrics: dict[str, float] | None, examples: float,
                       dtype: np.dtype) -> np.ndarray:
    """This site's evaluation sums for the round's layout (zeros when it does not evaluate)."""
    layout = evaluation_layout(start.encoding)
    if layout is None:
        return np.zeros(0, dtype=dtype)
    return layout.encode(metrics or {}, examples if metrics else 0.0, dtype)


def encode_update(delta: np.ndarray | None, start: pb.RoundStart, admission: Admission,
                  randomness: AttemptRandomness, weight: float) -> PreparedUpdate:
    """Clip and encode ``delta`` as the round asks, with this attempt's randomness (None: an
    evaluation-only round, no update)."""
    if delta is None:
        return PreparedUpdate(np.zeros(0, dtype=np.uint64), 0.0, False, 0)
    return admission.encode(delta, start, randomness, weight)


def run_secagg(federation: Federation, start: pb.RoundStart, ring_vector: np.ndarray, admission: Admission,
               randomness: AttemptRandomness, graph_seed: bytes,
               members: frozenset[int]) -> tuple[str, str, int, int]:
    """The secure-aggregation stages with ``ring_vector``; returns (outcome, reason, survivors, version)."""
    number = int(start.round)
    try:
        driver = SecAggClientDriver(start, identity_key=federation.options.identity_key, graph_seed=graph_seed,
                                    seed=randomness.secagg, signature_memo=federation.options.signature_memo)
        driver.set_input(ring_vector)
        keys = driver.advertise()
    except (SecAggError, UnsupportedRoundError) as err:
        raise RoundLost(f"cannot take part in round {number}: {err}") from None

    federation._send("AdvertiseKeys", lambda h: federation.transport.advertise_keys(
        pb.AdvertiseKeysRequest(header=h, **keys)))
    while True:
        instruction = federation._next_instruction()
        kind = instruction.WhichOneof("instruction")
        try:
            done = _secagg_step(federation, driver, instruction, kind, start, admission, members)
        except (SecAggError, UnsupportedRoundError) as err:
            # a tampered share, too few survivors, or a refused (dangerous) unmasking request
            log.warning("round %d: secure aggregation stopped for this client: %s", number, err)
            raise RoundLost(f"secure aggregation: {err}") from None
        # not held through the next wait: the cohort's n keys, signatures or survivors
        del instruction
        if done is not None:
            return done


def _secagg_step(federation: Federation, driver: SecAggClientDriver, instruction: pb.PollResponse,
                 kind: str | None, start: pb.RoundStart, admission: Admission,
                 members: frozenset[int]) -> tuple[str, str, int, int] | None:
    """Act on one instruction during secure aggregation; returns the outcome when the round ends."""
    transport = federation.transport
    number = int(start.round)
    if kind == "peer_keys":
        strangers = sorted({int(k.client_id) for k in instruction.peer_keys.keys} - members)
        if strangers:  # keys from clients that were not in the commitment list the seed was drawn over
            raise UnsupportedRoundError(f"peer_keys: clients {strangers[:5]} advertised keys without having "
                                        "committed to the graph seed")
        shares = driver.share_keys(instruction.peer_keys)
        federation._send("ShareKeys", lambda h: transport.share_keys(pb.ShareKeysRequest(header=h, shares=shares)))
    elif kind == "incoming_shares":
        try:
            masked = driver.masked_input(instruction.incoming_shares)
        except ShareComplaintsError as err:  # boxes that do not open: say whose, with the evidence
            complaints = driver.complaints(err)
            federation._send("ComplainAboutShares", lambda h: transport.complain_about_shares(
                pb.ShareComplaintsRequest(header=h, complaints=complaints)))
            raise
        _record_release(federation, start, admission)
        federation._send("SubmitMaskedInput", lambda h: transport.submit_masked_input(
            pb.MaskedInputRequest(header=h, masked_vector=masked)))
    elif kind == "survivor_check":
        signature = driver.confirm_survivors(instruction.survivor_check)
        federation._send("ConfirmSurvivors", lambda h: transport.confirm_survivors(
            pb.ConfirmSurvivorsRequest(header=h, signature=signature)))
    elif kind == "unmasking":
        revealed = driver.unmask(instruction.unmasking)
        assert federation.run_id is not None
        # before the shares leave: never another input for this round, nor for this model
        federation.state.released(federation.run_id, number, admission.model_digest)
        federation._send("Unmask", lambda h: transport.unmask(pb.UnmaskRequest(header=h, shares=revealed)))
    elif kind == "round_result":
        result = instruction.round_result
        if int(result.round) != number:
            return None
        return (OUTCOME_NAMES.get(result.outcome, "unknown"), result.reason, int(result.survivors),
                int(result.new_model_version))
    elif kind in ("round_start", "evaluate", "job_done"):
        federation._pending = instruction  # the round went on without us
        raise RoundLost(f"the server moved on ({kind}) before round {number} finished for this client")
    return None


def _record_release(federation: Federation, start: pb.RoundStart, admission: Admission) -> None:
    """The masked input is about to leave: a release in the site's own ledger, before it is sent."""
    assert federation.run_id is not None
    mode = start.dp.mode or "none"
    event = admission.guaranteed_event
    details: dict[str, Any] = {"cohort": int(start.secagg.cohort_size), "threshold": int(start.secagg.threshold),
                               "honest_contributors": admission.honest_contributors}
    note = "" if event is not None else {
        "none": "no DP: the released sum carries this site's exact update",
        "local": "user level unprotected (sample-level DP-SGD only)",
        "central": "central noise is added by the server; this site does not trust it to",
    }.get(mode, "no user-level noise this site can rely on")
    release = Release(federation.run_id, int(start.round), int(start.attempt), mode, event is not None, note)
    federation.state.sent_masked_input(release, event, details)


__all__ = [
    "PolicyViolation", "RoundEnded", "RoundLost", "admit", "agree_graph_seed", "attempt_randomness",
    "encode_update", "evaluation_section", "run_secagg",
]
