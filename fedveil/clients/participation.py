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
from fedveil.clients.options import RoundOutcome
from fedveil.clients.policy import PolicyViolation
from fedveil.clients.secagg_driver import SecAggClientDriver, UnsupportedRoundError
from fedveil.clients.shared_round_views import commitment_table, graph_seed_of
from fedveil.clients.site_state import Release
from fedveil.clients.update import (
    AttemptRandomness,
    PreparedUpdate,
    RoundConfigError,
    attempt_randomness,
    evaluation_layout,
    model_delta,
)
from fedveil.errors import FedveilError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg import beacon
from fedveil.secagg.errors import SecAggError, ShareComplaintsError

if TYPE_CHECKING:
    from torch import nn

    from fedveil.clients.round import Round
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
                       verified=federation.verified_credentials,
                       has_evaluator=federation.options.evaluate is not None)


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
    # the process's one copy of the list (a site's own serialization is not held while it waits)
    table = commitment_table(_wait_for(federation, "commitments", int(start.round)).commitments.SerializeToString())
    try:
        if table.listed_twice:
            raise beacon.BeaconError("commitment list: a client is listed twice")
        beacon.check_commitments(table.commitments, own_id=me, own_commitment=mine,
                                 num_clients=int(start.secagg.cohort_size))
    except SecAggError as err:
        raise RoundLost(f"graph seed: {err}") from None
    federation._send("RevealContribution", lambda h: federation.transport.reveal_contribution(
        pb.RevealRequest(header=h, contribution=randomness.beacon)))
    revealed = _wait_for(federation, "contributions", int(start.round)).contributions.SerializeToString()
    try:
        return graph_seed_of(round_id, table.listed, revealed), table.members
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


def only_dp_trained(local: np.ndarray, global_vector: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """Under local DP only the parameters DP-SGD trained may leave changed: every other federated entry
    (a float buffer such as running statistics, a frozen parameter) goes back to the global model's
    value, since no per-example clipping or noise covered it (review of 2026-12-07: a BatchNorm without
    weights sent its exact batch means)."""
    if trainable.all():
        return local
    untrained = ~trainable
    if not np.array_equal(local[untrained], global_vector[untrained]):
        log.warning("local DP: %d model value(s) outside the trained parameters changed in training (running "
                    "statistics?); they are sent unchanged, as no DP-SGD noise covers them", int(untrained.sum()))
    out = local.copy()
    out[untrained] = global_vector[untrained]
    return out


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
        "central": "central noise is added by the server, which this site does not trust to add it",
    }.get(mode, "no user-level noise this site can rely on")
    release = Release(federation.run_id, int(start.round), int(start.attempt), mode, event is not None, note)
    federation.state.sent_masked_input(release, event, details)


def _rejoined(fed: Federation, rnd: Round) -> RoundOutcome | None:
    """A 'dropped' outcome, recorded, when the site re-joined since ``rnd`` started (its session, and
    with it its place in the round, is gone); None otherwise."""
    if fed._round_header == (rnd.number, bytes(rnd.start_message.round_nonce)):
        return None
    outcome = RoundOutcome(rnd.number, "dropped", "the client re-joined during the round")
    fed.history.append(outcome)
    log.warning("round %d: dropped (the server lost this client's session)", rnd.number)
    return outcome


def finish_round(fed: Federation, rnd: Round, trained: nn.Module | None, num_examples: int | None) -> RoundOutcome:
    """Encode the trained model's update (``trained`` None: an evaluation-only round) and run the
    round's secure aggregation: what :meth:`Round.submit` ends in."""
    start = rnd.start_message
    lost = _rejoined(fed, rnd)
    if lost is not None:
        return lost
    delta = None
    if trained is not None:
        spend = None
        if rnd._privatized is not None:
            local = only_dp_trained(fed._account_local_dp(rnd, trained), rnd.global_vector,
                                    fed.spec.trainable_mask(trained))
            spend = fed.local_privacy
        else:
            local = fed.spec.vector(trained)
        clear = rnd._metrics if (rnd._metrics is not None and not start.encoding.evaluation.dimension) else None
        if clear is not None or spend is not None:
            # this site's own DP-SGD spend (a claim the server labels as reported by the site), and
            # the global model's metrics in the clear only when both sides opted in to that
            fed._report_metrics(int(start.model.version), clear or {}, spend,
                                num_examples=num_examples or rnd._loader_examples)
            lost = _rejoined(fed, rnd)
            if lost is not None:
                return lost
        delta = model_delta(local, rnd.global_vector)
    # the weight this site declared when it accepted the round (the server checks the masked one against it)
    weight = declared_weight(fed, start)
    prepared = encode_update(delta, start, rnd.admission, rnd._randomness, weight)
    try:
        section = evaluation_section(start, rnd._metrics, rnd._eval_examples,
                                     prepared.ring_vector.dtype if delta is not None else ring_dtype(start))
        ring = np.concatenate([prepared.ring_vector.astype(section.dtype, copy=False), section]) \
            if section.size else prepared.ring_vector
        done = run_secagg(fed, start, ring, rnd.admission, rnd._randomness, rnd._graph_seed, rnd._members)
        outcome = RoundOutcome(rnd.number, done[0], done[1], done[2], done[3], prepared.norm, prepared.clipped)
    except RoundLost as err:
        log.warning("round %d: dropped out (%s)", rnd.number, err)
        outcome = RoundOutcome(rnd.number, "dropped", str(err), update_norm=prepared.norm, clipped=prepared.clipped)
    except (UnsupportedRoundError, RoundConfigError) as err:  # checked at admission; kept as a backstop
        log.warning("round %d: cannot take part (%s)", rnd.number, err)
        outcome = RoundOutcome(rnd.number, "dropped", str(err))
    fed._round_header = (0, b"")
    fed.history.append(outcome)
    log.info("round %d: %s%s", rnd.number, outcome.outcome, f" ({outcome.reason})" if outcome.reason else "")
    return outcome


def ring_dtype(start: pb.RoundStart) -> np.dtype:
    """The unsigned integer type of the round's ring (32 or 64 bits)."""
    return np.dtype(np.uint32 if int(start.encoding.ring_bits) <= 32 else np.uint64)


__all__ = [
    "PolicyViolation", "RoundEnded", "RoundLost", "admit", "agree_graph_seed", "attempt_randomness",
    "encode_update", "evaluation_section", "finish_round", "ring_dtype", "run_secagg",
]
