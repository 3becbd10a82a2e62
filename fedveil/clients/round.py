"""One round as the user's training loop sees it: the global model in, the trained model back.

:class:`Round` is what iterating a :class:`~fedveil.clients.session.Federation` yields. Its
:meth:`Round.privatize` checks and wraps the loop's objects for local DP before any step is taken,
and :meth:`Round.submit` hands the trained model to the federation, which encodes, masks and
aggregates it (:mod:`fedveil.clients.session`, :mod:`fedveil.clients.participation`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedveil.clients.admission import Admission
from fedveil.clients.model_check import check_trainable
from fedveil.clients.options import ClientError, RoundOutcome
from fedveil.clients.policy import PolicyViolation, TrainingRefused, check_training
from fedveil.clients.update import AttemptRandomness
from fedveil.protocol import fedveil_pb2 as pb

if TYPE_CHECKING:
    from fedveil.clients.session import Federation


class Round:
    """One round for the user's training loop: the global model in, the trained model back.

    Attributes:
        number: the round (1-based); ``total_rounds`` how many the job has.
        model: the user's model with the global weights loaded.
        generator: a seeded ``torch.Generator`` for this client and round (pass it to a
            ``DataLoader(..., shuffle=True, generator=rnd.generator)`` for reproducible runs).
        learning_rate, batch_size, local_epochs: what the server suggests (0: the task's default).
    """

    def __init__(self, federation: Federation, start: pb.RoundStart, model: nn.Module, admission: Admission,
                 randomness: AttemptRandomness, graph_seed: bytes) -> None:
        self._federation = federation
        self._start = start
        self.admission = admission
        self._randomness = randomness
        self._graph_seed = graph_seed
        self.number = int(start.round)
        self.total_rounds = federation.total_rounds
        self.model = model
        self.global_vector = federation.spec.vector(model).copy()
        self.learning_rate = float(start.training.learning_rate)
        self.batch_size = int(start.training.batch_size)
        self.local_epochs = int(start.training.local_epochs)
        self.dp_mode = start.dp.mode or "none"
        self.seed = randomness.shuffle
        self.generator = torch.Generator().manual_seed(self.seed)
        self.outcome: RoundOutcome | None = None
        self._privatized: Any = None
        self._metrics: dict[str, float] | None = None
        self._eval_examples = 0.0
        self._loader_examples = 0
        """Records in the loader given to :meth:`privatize` (reported with the DP-SGD spend, so the server
        can check the sample rate against them)."""
        self._members: frozenset[int] = frozenset()

    def privatize(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> tuple[Any, Any, Any]:
        """Wrap ``(model, optimizer, loader)`` for local DP-SGD when the job uses local DP.

        Returns them unchanged in every other DP mode (and when the site passed its own
        ``privacy_engine``), so a loop can always call it. The model goes into train mode first (a
        ``test()`` run may have left it in eval mode). Everything that would make the round
        unsubmittable is checked before the first step, so no budget is spent on it: a layer DP-SGD
        cannot train raises :class:`fedveil.dp.compat.UnsupportedLayerError` naming the layer and
        the remedy, and a model that does not fit the job's model raises
        :class:`fedveil.model_spec.ModelMismatchError` naming the first differing parameter. The
        client's own accountant (one across all rounds) records the steps taken. With a target
        ε, a round the remaining budget cannot afford raises
        :class:`fedveil.dp.ledger.BudgetExceededError` here, before any training; the loop can
        then :meth:`decline` the round (as :func:`fedveil.clients.run_client` does). The check uses the
        steps this round really takes (its own ``local_epochs``, the loader's batches), not the first
        round's plan, and the budget is the tighter of the job's target and the site's own
        ``max_local_epsilon``; the steps actually taken are checked again before release (:meth:`submit`).

        The round's training parameters are checked against the site's policy first
        (:func:`fedveil.clients.policy.check_training`: ``max_local_epochs`` in every mode; under
        local DP ``max_local_delta``, ``max_local_epsilon``, ``min_local_noise_multiplier``). A
        round that breaks it raises :class:`fedveil.clients.policy.TrainingRefused`, a
        ``BudgetExceededError`` too, so the same loops decline it before any step.
        """
        model.train()
        self._loader_examples = _dataset_size(loader)
        self._check_training()
        if self.dp_mode == "local":
            self._check_untrained(self._federation._dp_originals.get(id(model), model))
        if self.dp_mode != "local" or self._federation.options.privacy_engine is not None:
            self._federation.spec.check(model)
            if self.dp_mode == "local":  # the site's own engine: batch norms and the like are refused here too
                from fedveil.clients.local_dp import engine_sampling_problem
                from fedveil.dp.compat import check_dp_trainable  # opacus at import configures the root logger

                check_dp_trainable(model)
                problem = engine_sampling_problem(model, loader)
                if problem:  # before any step: the accountant would count these batches as Poisson ones
                    raise ClientError(f"round {self.number}: {problem}")
                self._federation._local_dp().guard(model, optimizer)
            self._privatized = (model, optimizer, loader) if self.dp_mode == "local" else None
            return model, optimizer, loader
        # A loop that rebinds its names (``model, optimizer, loader = rnd.privatize(...)``) hands
        # last round's wrapped objects back: privatize the originals again instead.
        originals = self._federation._dp_originals
        model = originals.get(id(model), model)
        optimizer = originals.get(id(optimizer), optimizer)
        loader = originals.get(id(loader), loader)
        model.train()
        check_trainable(model, self._federation.spec)
        wrapped = self._federation._local_dp().privatize(
            self._start.dp.local, model, optimizer, loader, local_epochs=self.local_epochs or 1,
            policy=self._federation.policy,
        )
        originals.clear()
        originals.update({id(w): o for w, o in zip(wrapped, (model, optimizer, loader), strict=True)})
        self._federation._dp_wrapped = wrapped  # keep them alive so their ids stay unique
        self._privatized = wrapped
        return wrapped

    def _check_untrained(self, model: nn.Module) -> None:
        """Under local DP the model must still hold the round's global weights when it is privatized: only
        the DP-SGD steps after are accounted (the review of 2026-12-07 released a step taken before)."""
        try:
            unchanged = np.array_equal(self._federation.spec.vector(model), self.global_vector)
        except (KeyError, ValueError, RuntimeError):  # another model than the job's: the spec check names it
            return
        if not unchanged:
            raise ClientError(
                f"round {self.number}: the model's weights changed after the round's global model was loaded and "
                "before rnd.privatize (training outside DP-SGD, or another model than the one given to federate): "
                "only DP-SGD's steps are accounted, so train only with the objects rnd.privatize returns")

    def submit(self, model: nn.Module | None = None, *, num_examples: int | None = None) -> RoundOutcome:
        """Send the trained model's update (masked) and finish the round's secure aggregation.

        Blocks until the server announces how the round ended, and returns that outcome. Raw
        data and unmasked updates never leave the process.
        """
        if self.outcome is not None:
            raise ClientError(
                f"round {self.number}: already over for this client ({self.outcome.outcome}: "
                f"{self.outcome.reason or 'submit() was already called'})"
            )
        fed = self._federation
        if self.dp_mode == "local" and self._privatized is None and fed.options.privacy_engine is not None:
            # the site's own make_private[_with_epsilon] call wrapped its objects already: its engine's
            # accountant is the round's record of DP-SGD (privatize would return them unchanged)
            self._privatized = (model if model is not None else self.model, None, None)
        if self.dp_mode == "local" and self._privatized is None:
            # the job promises sample-level DP for every site: an update trained without it must not leave
            raise ClientError(
                f"round {self.number}: the job runs local DP (--dp local); call "
                "rnd.privatize(model, optimizer, loader) before training, then submit"
            )
        trained = model if model is not None else self.model
        if self.dp_mode == "local" and self._privatized is not None:
            # before release: the round's parameters (a loop with its own engine may not have called
            # privatize) and the steps actually taken against the site's budget
            refusal = self._training_refusal() or fed._local_dp().training_problem()
            over = refusal or fed._local_dp().over_budget(fed.policy)
            if over:  # the steps were taken (and are accounted), but the update is not released
                fed._account_local_dp(self, trained)
                # only the budget benches the site for the run; a loop's mistake or a refused parameter does not
                fed._sit_out(self, over, "declined", out_of_budget=not refusal)
                assert self.outcome is not None
                return self.outcome
        self.outcome = fed._finish_round(self, trained, num_examples)
        return self.outcome

    def decline(self, reason: str, *, out_of_budget: bool = False) -> RoundOutcome:
        """Sit this round out instead of submitting (e.g. the local privacy budget cannot afford it).

        The server is told at once (``RespondToRound`` with ``accept=false``) and drops the client
        from the round; the iterator moves on to the next instruction. The round is recorded in
        :attr:`Federation.history` as ``"declined"`` with ``reason``. ``out_of_budget``: the site's
        budget cannot afford any later round of the job either, so the server need not draw it again.
        """
        if self.outcome is not None:
            raise ClientError(f"round {self.number}: already over for this client ({self.outcome.outcome})")
        self._federation._sit_out(self, reason, "declined", out_of_budget=out_of_budget)
        assert self.outcome is not None
        return self.outcome

    @property
    def start_message(self) -> pb.RoundStart:
        return self._start

    def _policy_violation(self) -> PolicyViolation | None:
        """How this round's training parameters break the site's policy (None: they do not)."""
        try:
            check_training(self._federation.policy, self._start, num_examples=self._loader_examples)
        except PolicyViolation as err:
            return err
        return None

    def _training_refusal(self) -> str:
        """Why this round's training parameters break the site's policy ("" when they do not)."""
        err = self._policy_violation()
        return f"policy: {err}" if err is not None else ""

    def _check_training(self) -> None:
        """Raise :class:`TrainingRefused` (before any step) when the round breaks the site's policy."""
        err = self._policy_violation()
        if err is not None:
            spend = self._federation.local_privacy if self.dp_mode == "local" else None
            raise TrainingRefused(err.field, err.detail, round_index=self.number,
                                  epsilon=float(spend.epsilon) if spend is not None else 0.0,
                                  budget=self._federation.policy.max_local_epsilon,
                                  delta=float(self._start.dp.local.delta) or self._federation.policy.max_local_delta)


def _dataset_size(loader: Any) -> int:
    """Records in a data loader's dataset (0 when it cannot tell, e.g. an iterable dataset)."""
    try:
        return max(len(loader.dataset), 0)
    except (AttributeError, TypeError):
        return 0
