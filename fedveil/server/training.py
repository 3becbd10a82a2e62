"""The global model's side of a round: what clients must encode, and what the released sum does.

:class:`GlobalModel` holds the flat float parameters (``fedveil.task.model_to_vector`` layout),
the server optimizer (``fedveil.server.optimizers``), the user-level DP mechanism and the
privacy ledger (``fedveil.dp``). For each round it produces a :class:`RoundPlan` (encoding and
DP parameters sent to the cohort in ``RoundStart``) and, given the unmasked ring sum, applies
the round: the job's privacy mechanism decodes the sum (:mod:`fedveil.server.mechanisms`: plain
mean, central noise or distributed-DP decode) → mean update → optimizer step. It never sees an
individual client's update, only the secure sum.

User-level DP (``--dp central``, DP-FedAvg, McMahan et al. 2018): clients clip their update to
``S``; the server adds N(0, (zS)^2) to the sum and divides by the expected cohort size K; each
round is one Gaussian event for the sampling that really happened
(:func:`fedveil.dp.sampling.user_level_event`): the cohort is K of the N sites connected at the
draw, uniformly without replacement, so without ``--dp-sampling-amplification`` (the default), or
when K >= N, it is the plain Gaussian (q = 1); with it, sampling without replacement (K of N,
replace-one relation). ``--dp distributed``: clients
add Skellam/discrete-Gaussian shares (``fedveil.dp.distributed``); the round is accounted with
that mechanism's own RDP bound for the smallest number of contributors the round can complete
with (the threshold t), which is conservative, and claims no sampling amplification. ``--dp local``:
clients run DP-SGD and report their sample-level spend, which the ledger records per client.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedveil.dp.accounting import DpEvent, RDPAccountant, SubsampledGaussianEvent
from fedveil.dp.central import DPFedAvg
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger, RoundSpend
from fedveil.metrics import DEFAULT_METRICS, EvaluationLayout
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.config import ServerConfig
from fedveil.server.mechanisms import PrivacyMechanism, mechanism_class
from fedveil.server.optimizers import ServerOptimizer, make_optimizer
from fedveil.server.round_plan import RoundPlan


def _derived_seed(seed: int, purpose: str, *parts: int) -> int:
    data = f"fedveil/server/{purpose}/{seed}/" + "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def round_seed(seed: int, round_number: int) -> int:
    """The public per-round seed sent to clients (``TrainingParams.seed``)."""
    return _derived_seed(seed, "round", round_number)


@dataclass(frozen=True)
class AppliedRound:
    """The result of applying one round's secure sum to the global model."""

    aggregate: np.ndarray
    """The released mean update (after noise, before the server optimizer)."""
    aggregate_digest: str
    """SHA-256 of the released mean update (float32 bytes, after any noise)."""
    params: np.ndarray
    stats: dict[str, Any]
    optimizer: ServerOptimizer
    """The optimizer after this round's step (installed by :meth:`GlobalModel.commit`)."""
    dpfedavg: DPFedAvg | None
    """The DP-FedAvg state after this round (adaptive clipping moves the clip norm)."""
    evaluation: tuple[dict[str, float], float] | None = None
    """The cohort's securely summed evaluation: weighted means and total examples."""


class GlobalModel:
    """Parameters, server optimizer, user-level DP and the privacy ledger of one job."""

    def __init__(self, config: ServerConfig, initial_params: np.ndarray, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.params = np.asarray(initial_params, dtype=np.float32).copy()
        self.dim = int(self.params.shape[0])
        self.version = 0
        self.optimizer: ServerOptimizer = make_optimizer(config.training.optimizer, lr=config.training.server_lr)
        self.mechanism: PrivacyMechanism = mechanism_class(config.privacy.mode)(config, self.dim)
        """The job's privacy mechanism: its plan, decode and ledger event (:mod:`fedveil.server.mechanisms`)."""
        self.ledger: PrivacyLedger | None = None
        if self.mechanism.keeps_ledger:
            self.ledger = PrivacyLedger(
                LedgerConfig(
                    accountant=config.privacy.accountant,
                    federation_delta=config.privacy.delta,
                    client_delta=config.privacy.delta,
                    federation_epsilon_budget=config.privacy.epsilon_budget,
                    client_epsilon_budget=config.privacy.client_epsilon_budget,
                )
            )
        self.dpfedavg: DPFedAvg | None = self.mechanism.new_state()

    # -- planning --------------------------------------------------------------------------------
    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes, *,
             evaluation_only: bool = False, metrics: tuple[str, ...] = ()) -> RoundPlan:
        """The round's encoding and DP parameters; ``metrics`` adds a secure evaluation section
        (never under user-level DP), and ``evaluation_only`` asks for nothing else."""
        cfg = self.config
        if metrics and cfg.user_level_dp:
            raise ValueError("metrics: secure evaluation sums would be released without user-level noise")
        if evaluation_only:
            layout = EvaluationLayout.plan(metrics or DEFAULT_METRICS, cohort_size, cfg.secagg.ring_bits)
            encoding = pb.EncodingParams(ring_bits=cfg.secagg.ring_bits, dimension=layout.dimension,
                                         evaluation=evaluation_encoding(layout))
            return RoundPlan(round_number, cohort_size, threshold, layout.dimension, cfg.secagg.ring_bits, encoding,
                             pb.DpParams(mode=cfg.privacy.mode), evaluation=layout, evaluation_only=True)
        plan = self._update_plan(round_number, cohort_size, threshold, context)
        if metrics:
            layout = EvaluationLayout.plan(metrics, cohort_size, plan.ring_bits)
            plan.encoding.evaluation.CopyFrom(evaluation_encoding(layout))
            plan.encoding.dimension = plan.dimension + layout.dimension
            plan.dimension += layout.dimension
            plan.evaluation = layout
        return plan

    def _update_plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes) -> RoundPlan:
        return self.mechanism.plan(round_number, cohort_size, threshold, context, self.dpfedavg)

    def reserve_budget(
        self, plan: RoundPlan, available_at_draw: int, *, amplification: bool | None = None
    ) -> RoundSpend | None:
        """Record the round's user-level DP event in the ledger, or raise ``BudgetExceededError``.

        ``available_at_draw`` is the number of sites the cohort was drawn from (those connected at the
        draw), never the enrolled ones: an offline site could not have been picked. ``amplification``
        defaults to ``config.privacy.sampling_amplification``; a caller may pass ``False`` to withdraw the
        claim for this round (e.g. when the participant list has been shown), never ``True`` against
        the configuration.
        """
        cfg = self.config
        if self.ledger is None or not self.mechanism.user_level:
            return None
        if amplification is None:
            amplification = cfg.privacy.sampling_amplification
        elif amplification and not cfg.privacy.sampling_amplification:
            raise ValueError(
                "--dp-sampling-amplification: this job does not claim sampling amplification, "
                "so a round cannot claim it (got amplification=True)"
            )
        entry = self.mechanism.privacy_event(plan, available_at_draw, amplification, self.dpfedavg)
        if entry is None:
            return None
        return self.ledger.reserve(plan.round_number, federation=entry.event, mechanism=entry.mechanism,
                                   details=entry.details)

    def keep_budget(self, round_number: int) -> None:
        """The round's latest attempt counts as a release: no later cancel takes its ledger entry back."""
        if self.ledger is not None and round_number in self.ledger.rounds:
            self.ledger.keep_round(round_number)

    def cancel_budget(self, round_number: int) -> None:
        """Take back a reservation of a round that aborted before releasing anything."""
        if self.ledger is not None and round_number in self.ledger.rounds:
            self.ledger.cancel_round(round_number)

    # -- applying ---------------------------------------------------------------------------------
    def apply(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int,
              declared_weight: float | None = None) -> AppliedRound:
        """Decode the sum and step a *copy* of the optimizer (and DP state): nothing changes until
        :meth:`commit`, so a round whose store transaction fails leaves the model as it was.

        The decoded sum is checked against what honest sites can produce (:mod:`fedveil.server.sanity`);
        outside it, :class:`~fedveil.server.sanity.AggregateRejected` is raised and nothing is applied.
        ``declared_weight`` is the survivors' total weight as they declared it in the clear.
        """
        evaluation = None
        if plan.evaluation is not None:
            section = plan.evaluation.dimension
            evaluation = plan.evaluation.decode(ring_sum[len(ring_sum) - section:], survivors)
            ring_sum = ring_sum[: len(ring_sum) - section]
        if plan.evaluation_only:
            return AppliedRound(np.zeros(0, np.float32), "", self.params, {"survivors": survivors},
                                self.optimizer, self.dpfedavg, evaluation)
        optimizer = copy.deepcopy(self.optimizer)
        dpfedavg = copy.deepcopy(self.dpfedavg)
        decoded = self.mechanism.decode(plan, ring_sum, survivors, declared_weight, dpfedavg)
        stats: dict[str, Any] = {"survivors": survivors, **decoded.stats}
        mean = decoded.mean
        mean = np.asarray(mean[: self.dim], dtype=np.float64)
        new_params = np.asarray(optimizer.step(self.params.astype(np.float64), mean), dtype=np.float32)
        if not np.all(np.isfinite(new_params)):
            raise FloatingPointError(f"round {plan.round_number}: the new global model has NaN or infinite values")
        stats["update_norm"] = float(np.linalg.norm(mean))
        released = mean.astype(np.float32)
        # the digest of what was released (after any noise), never of the un-noised ring sum
        digest = hashlib.sha256(np.ascontiguousarray(released).tobytes()).hexdigest()
        return AppliedRound(released, digest, new_params, stats, optimizer, dpfedavg, evaluation)

    def skip(self) -> None:
        """A rejected round: counted (the version moves on), nothing applied."""
        self.version += 1

    def commit(self, applied: AppliedRound) -> None:
        self.params = applied.params
        self.optimizer = applied.optimizer
        self.dpfedavg = applied.dpfedavg
        self.version += 1

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, applied: AppliedRound | None = None, *, skipping: bool = False) -> dict[str, Any]:
        """Checkpoint state now, or as it will be once ``applied`` is committed (or the round skipped)."""
        opt = applied.optimizer if applied is not None else self.optimizer
        dp = applied.dpfedavg if applied is not None else self.dpfedavg
        # Long number lists (an adaptive optimizer's moments) become arrays: the store keeps them
        # as raw bytes rather than JSON text.
        optimizer = {k: np.asarray(v, dtype=np.float64) if isinstance(v, list) and len(v) > 64 else v
                     for k, v in opt.state_dict().items()}
        state: dict[str, Any] = {"version": self.version + (1 if applied is not None or skipping else 0),
                                 "optimizer": optimizer}
        if dp is not None and dp.adaptive is not None:
            state["adaptive_clipping"] = dp.adaptive.state_dict()
        return state

    def load(self, params: np.ndarray, state: dict[str, Any], ledger_json: str | None) -> None:
        if params.shape != self.params.shape:
            raise ValueError(f"checkpoint has {params.shape[0]} parameters, the task's model has {self.dim}")
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.version = int(state.get("version", 0))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "adaptive_clipping" in state and self.dpfedavg is not None and self.dpfedavg.adaptive is not None:
            self.dpfedavg.adaptive.load_state_dict(state["adaptive_clipping"])
        if ledger_json is not None and self.ledger is not None:
            self.ledger = PrivacyLedger.from_json(ledger_json)
            # A federation reservation saved for a round that never completed (the server died
            # mid-round) is taken back: that round is redone and reserves again.
            for r in sorted((r for r in self.ledger.rounds if r > self.version), reverse=True):
                try:
                    self.ledger.cancel_round(r)
                except ValueError:
                    pass

    def verifier(self) -> RDPAccountant:
        """An RDP accountant kept for checking sites' claims: its curve cache lives as long as the job."""
        if self._verifier is None:
            self._verifier = RDPAccountant()
        return self._verifier

    _verifier: RDPAccountant | None = None

    def client_events(self, client: str) -> list[DpEvent]:
        """The site's sample-level events in the ledger (its earlier reported rounds), in order."""
        if self.ledger is None:
            return []
        return [e.event for e in self.ledger.entries if e.party == client]

    def ledger_with_client_spend(
        self, round_number: int, client: str, event: SubsampledGaussianEvent, details: dict[str, Any]
    ) -> PrivacyLedger | None:
        """A *copy* of the ledger with a site's reported sample-level DP-SGD spend recorded (no budget
        check: it is done), or ``None`` when it cannot be recorded. The caller stores the copy and only
        then adopts it (``self.ledger = ...``), so a failed store leaves the ledger as it was and the
        site's retry is recorded once."""
        if self.ledger is None:
            return None
        ledger = self.ledger.copy()
        try:
            ledger.record(round_number, clients={client: event}, client_details=details)
        except (ValueError, ArithmeticError):
            return None
        return ledger


def evaluation_encoding(layout: EvaluationLayout) -> pb.EvaluationEncoding:
    """The wire form of a secure evaluation section's layout."""
    return pb.EvaluationEncoding(metrics=list(layout.metrics), clip=layout.value_clip,
                                 fractional_bits=layout.frac_bits, dimension=layout.dimension,
                                 limb_bits=layout.limb_bits, limbs=layout.limbs, max_examples=layout.max_examples)
