"""The client's local (sample-level) DP-SGD across rounds, configured by the server's round.

One :class:`LocalDpClient` per client process holds one :class:`fedveil.dp.local.LocalDPSession`,
hence one accountant for the client's whole participation: the client, not the server, knows
how much privacy its own records have spent, and reports it (``LocalPrivacySpend``).

The guarantee is the site's, not the server's. With the site's :class:`~fedveil.clients.policy.SitePolicy`
the round's δ, target ε and noise must be within its limits (:func:`~fedveil.clients.policy.check_training`),
the noise a target solves to must meet its floor, and the budget is the tighter of the job's target
and the site's ``max_local_epsilon``. That budget is checked twice with the steps a round really
takes, never with the first round's plan: before training, with the round's own ``local_epochs``
and the batches of the loader the loop hands over (a server that raises the epochs or changes the
batch size between rounds is refused before any step), and again before the update is released,
with the steps actually taken (:meth:`LocalDpClient.over_budget`: a loop may train more than it
was asked). Pinning the first round's epochs instead would refuse an honest change that costs
less, and would still miss a batch-size change and a loop that trains past the number it was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedveil.clients.policy import SitePolicy, TrainingRefused, local_accountant
from fedveil.dp.events import AccountingLimitError, DpEvent, SubsampledGaussianEvent
from fedveil.dp.ledger import BUDGET_REL_TOLERANCE, BudgetExceededError
from fedveil.dp.local import LocalDPConfig, LocalDPSession
from fedveil.dp.step_guard import StepGuard
from fedveil.protocol import fedveil_pb2 as pb

LIFETIME_PARTY = "max_lifetime_local_epsilon (this site, all its jobs)"
"""How a refusal by ``max_lifetime_local_epsilon`` names whose budget it is."""
_SLACK = 1.0 + BUDGET_REL_TOLERANCE
"""Relative slack of the budget comparisons (the accountant's floating point), as the ledger's."""


def local_dp_config(params: pb.LocalDpParams, *, seed: int | None = None, local_epochs: int = 1,
                    policy: SitePolicy | None = None) -> LocalDPConfig:
    """The DP-SGD configuration a round's ``LocalDpParams`` describe (target ε when it is set).

    With the site's ``policy``: its ``max_local_epsilon`` caps the ε the session spends in either
    mode, and a job that gives no δ is accounted at the site's ``max_local_delta`` (else 1e-5). The
    accountant is the job's (:func:`~fedveil.clients.policy.check_training` has held it to the
    policy's ``local_accountants``), RDP when the job names none."""
    target = float(params.target_epsilon)
    default_delta = policy.max_local_delta if policy is not None else 1e-5
    return LocalDPConfig(
        max_grad_norm=float(params.max_grad_norm),
        noise_multiplier=None if target > 0 else float(params.noise_multiplier),
        target_epsilon=target if target > 0 else None,
        planned_rounds=int(params.planned_rounds) if target > 0 else None,
        local_epochs=max(int(local_epochs), 1),
        delta=float(params.delta) if params.delta > 0 else default_delta,
        accountant=local_accountant(params),
        max_physical_batch_size=int(params.max_physical_batch_size) or None,
        seed=seed,
        epsilon_budget=policy.max_local_epsilon if policy is not None else None,
    )


LifetimeEpsilon = Callable[[DpEvent | None], float]
"""The site's ε over all its jobs with an event composed in (``SiteState.lifetime_local_epsilon``)."""


def over_lifetime(lifetime: LifetimeEpsilon | None, policy: SitePolicy | None, delta: float,
                  event: DpEvent | None) -> tuple[float, float, float, float] | None:
    """(ε before, ε after, cap, δ) when ``event`` would take the site past its policy's
    ``max_lifetime_local_epsilon`` over all its jobs; None when it would not, or there is no cap."""
    cap = policy.max_lifetime_local_epsilon if policy is not None else 0.0
    if cap <= 0 or lifetime is None or event is None:
        return None
    after = lifetime(event)
    return None if after <= cap * _SLACK else (lifetime(None), after, cap, delta)


def lifetime_reason(over: tuple[float, float, float, float]) -> str:
    _, after, cap, delta = over
    return (f"the site's DP-SGD steps over all its jobs would be at ε = {after:.3f} (δ = {delta:g}) with "
            f"this round's, past its max_lifetime_local_epsilon = {cap:g}")


class LocalDpClient:
    """Privatize the user's objects each round and keep the client's own accountant."""

    def __init__(self, seed: int | None = None, earlier: Callable[[], Sequence[DpEvent]] | None = None,
                 lifetime: LifetimeEpsilon | None = None, lifetime_delta: float = 1e-5) -> None:
        """``earlier``: the DP-SGD steps the site already took in this job (an earlier process's, from its
        saved state), read when the first round creates the session and composed into its accountant.
        ``lifetime(event)``: the site's ε over all its jobs with ``event`` composed in, for the policy's
        ``max_lifetime_local_epsilon`` (checked before training and again before release), measured at
        ``lifetime_delta`` (the δ of the site's saved ledger)."""
        self._seed = seed
        self._earlier = earlier
        self._lifetime = lifetime
        self._lifetime_delta = lifetime_delta
        self.session: LocalDPSession | None = None
        self._wrapped: nn.Module | None = None
        self._last_steps = 0

    def privatize(
        self, params: pb.LocalDpParams, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
        local_epochs: int = 1, policy: SitePolicy | None = None,
    ) -> tuple[Any, Any, Any]:
        """Wrap the loop's objects for this round's DP-SGD, for ``local_epochs`` passes over ``loader``.

        Raises :class:`BudgetExceededError` before any step when those steps would take the site's ε
        past its budget (see the module docstring), and :class:`TrainingRefused` when the noise a
        target solves to is below the ``policy``'s floor, or when the accountant cannot give ε for the
        round's parameters (a target no noise reaches, a PLD or PRV grid too large for a tiny noise
        multiplier): the server chose them, so the site declines the round instead of failing."""
        try:
            return self._privatize(params, model, optimizer, loader, max(int(local_epochs), 1), policy)
        except AccountingLimitError as err:
            target = float(params.target_epsilon) > 0
            raise TrainingRefused("dp.local.target_epsilon" if target else "dp.local.noise_multiplier",
                                  f"the {local_accountant(params)} accountant cannot account this round: {err}",
                                  round_index=self.session.rounds_completed if self.session is not None else 0,
                                  budget=policy.max_local_epsilon if policy is not None else math.inf) from None

    def _privatize(self, params: pb.LocalDpParams, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                   epochs: int, policy: SitePolicy | None) -> tuple[Any, Any, Any]:
        if self.session is None:
            session = LocalDPSession(local_dp_config(params, seed=self._seed, local_epochs=epochs, policy=policy))
            session.resume(self._earlier() if self._earlier is not None else ())
            self.session = session
        if policy is not None and (policy.min_local_noise_multiplier > 0 or policy.max_lifetime_local_epsilon > 0):
            plan = self.session.plan_round(loader, local_epochs=epochs)
            planned = SubsampledGaussianEvent(plan.sample_rate, plan.noise_multiplier, plan.steps)
            refusal = over_lifetime(self._lifetime, policy, self._lifetime_delta, planned)
            if refusal is not None:
                before, after, cap, delta = refusal
                raise BudgetExceededError(party=LIFETIME_PARTY, round_index=self.session.rounds_completed,
                                          epsilon_before=before, epsilon_after=after, budget=cap, delta=delta)
            if not plan.noise_multiplier >= policy.min_local_noise_multiplier:
                raise TrainingRefused(
                    "dp.local.target_epsilon" if self.session.config.target_epsilon is not None
                    else "dp.local.noise_multiplier",
                    f"DP-SGD would train with noise multiplier {plan.noise_multiplier:.4g}, below this site's "
                    f"min_local_noise_multiplier = {policy.min_local_noise_multiplier:g}",
                    round_index=self.session.rounds_completed, epsilon=plan.epsilon_before,
                    budget=plan.budget if plan.budget is not None else float("inf"), delta=plan.delta)
        wrapped = self.session.privatize(model, optimizer, loader, local_epochs=epochs)
        self._wrapped = wrapped[0]
        return wrapped

    def over_budget(self, policy: SitePolicy | None = None) -> str:
        """Why the round being trained may not be released ("" when it may): the steps it actually took
        would take the site's ε past its budget (the job's target or the session's cap, the tighter).
        Checked before release; the steps stay accounted either way (:meth:`finish_round`)."""
        if self.session is None or self._wrapped is None:
            return ""
        lifetime = over_lifetime(self._lifetime, policy, self._lifetime_delta, self.session.pending_event())
        if lifetime is not None:
            return lifetime_reason(lifetime)
        budget = self.session.config.budget
        if budget is None:
            return ""
        delta = self.session.config.delta
        after = self.session.pending_epsilon()
        if after > budget * _SLACK:
            return (f"the site's DP-SGD accountant would be at ε = {after:.3f} (δ = {delta:g}) after the steps "
                    f"this round took, past its budget ε = {budget:g}")
        return ""

    def training_problem(self) -> str:
        """Why the weights may not be released as this round's DP-SGD ("" when they may): the loop trained
        them outside it (:class:`~fedveil.dp.step_guard.StepGuard`). A loop's mistake, not the budget:
        the round is declined, and the site stays drawable."""
        if self.session is None or self._wrapped is None:
            return ""
        guard = self.session.step_guard
        return guard.problem() if guard is not None else ""

    @property
    def active(self) -> bool:
        return self._wrapped is not None

    def finish_round(self, trained: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Account the round and return the trained model's plain state dict (of the model this
        client wrapped; ``trained`` is the loop's handle on it and is not needed here)."""
        if self.session is None or self._wrapped is None:
            raise RuntimeError("finish_round() without privatize()")
        state = self.session.finish_round(self._wrapped)
        event = self.session.last_round_event
        self._last_steps = int(event.steps) if event is not None else 0
        self._wrapped = None
        return state

    @property
    def last_event(self) -> Any:
        """The DP-SGD event of the round just finished (its sampling rate, noise and steps)."""
        return self.session.last_round_event if self.session is not None else None

    def spend(self) -> pb.LocalPrivacySpend | None:
        if self.session is None or self.session.rounds_completed == 0:
            return None
        cfg = self.session.config
        return pb.LocalPrivacySpend(
            epsilon=float(self.session.epsilon()),
            delta=float(cfg.delta),
            noise_multiplier=float(self.session.noise_multiplier or 0.0),
            sample_rate=float(self.session.sample_rate or 0.0),
            steps=self._last_steps,
            accountant=cfg.accountant,
        )


def engine_sampling_problem(model: Any, loader: Any = None) -> str:
    """Why an engine site's Opacus accountant would under-report its ε ("" when it would not).

    Opacus accounts every step as Poisson-sampled at rate 1 / len(loader) (Abadi et al. 2016; Mironov
    et al. 2019), whatever the loader does. ``make_private(poisson_sampling=False)`` keeps the loop's
    shuffled, fixed-size batches, and a loop that accumulates gradients over several batches per step
    samples more than that rate: both are accounted as if they were Poisson batches, which they are
    not (shuffling gives a much larger ε at the same settings: Chua et al., "How Private are DP-SGD
    Implementations?", ICML 2024). ``make_private`` marks the hooks wrapper it returns with
    ``forbid_grad_accumulation()`` only under Poisson sampling, so the model must be that wrapper
    (``grad_sample_mode`` hooks, functorch or ghost: the ones that keep the mark) and keep the mark; a
    ``loader`` the loop hands over must draw Poisson batches itself. The review of this change found
    the inner module, or an ``ew`` wrapper, let a shuffled loader through."""
    allowed = getattr(model, "grad_accumulation_allowed", None)
    if allowed is None:
        return ("privacy_engine: give federate the module your make_private[_with_epsilon] call returned, with "
                "grad_sample_mode 'hooks' (Opacus's default), 'functorch' or 'ghost' (got "
                f"{type(model).__name__}): fedveil reads from that wrapper whether your engine samples the Poisson "
                "batches its accountant counts")
    if allowed is not False:
        return ("privacy_engine: the model's Opacus wrapper allows gradient accumulation, which make_private sets "
                "with poisson_sampling=False (or a loop's allow_grad_accumulation()): its accountant would still "
                "count each step as one Poisson-sampled batch at rate 1/len(loader), so this site's ε would be "
                "under-reported. Call make_private[_with_epsilon](..., poisson_sampling=True), Opacus's default")
    if loader is None:
        return ""
    from opacus.utils.batch_memory_manager import BatchSplittingSampler
    from opacus.utils.uniform_sampler import (
        DistributedUniformWithReplacementSampler,
        UniformWithReplacementSampler,
    )

    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, BatchSplittingSampler):  # BatchMemoryManager's physical batches of a Poisson batch
        sampler = sampler.sampler
    if not isinstance(sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)):
        return (f"loader: its batches are not Poisson-sampled (batch sampler {type(sampler).__name__}), but the "
                "site's Opacus accountant counts each step as a Poisson-sampled batch at rate 1/len(loader), so "
                "this site's ε would be under-reported. Train on the data loader make_private returned "
                "(poisson_sampling=True, Opacus's default)")
    return ""


class EngineDpClient:
    """A site that keeps its own Opacus code: ``federate(..., privacy_engine=engine)``.

    The site called ``PrivacyEngine.make_private[_with_epsilon]`` itself; the engine's accountant
    (one for the site's lifetime, as Opacus keeps it) is the site's sample-level ledger. Each round's
    steps are read from the accountant's history (the difference since the round began), so the
    site's own state records the round's DP-SGD event as it does for ``rnd.privatize``. ``delta`` is
    the job's local-DP δ (Opacus's engine does not keep the δ it was made private for).
    """

    def __init__(self, engine: Any, lifetime: LifetimeEpsilon | None = None, lifetime_delta: float = 1e-5,
                 model: nn.Module | None = None) -> None:
        """``lifetime``, ``lifetime_delta``: as :class:`LocalDpClient`'s; an engine site's round is checked
        against ``max_lifetime_local_epsilon`` before release only (its loop plans its own steps).
        ``model``: the module the engine wrapped, whose sampling is checked before each release
        (:func:`engine_sampling_problem`)."""
        accountant = getattr(engine, "accountant", None)
        if accountant is None or not callable(getattr(accountant, "get_epsilon", None)):
            raise TypeError(
                f"privacy_engine: expected an opacus.PrivacyEngine (got {type(engine).__name__})")
        self.engine = engine
        self.delta = 1e-5
        self.target_epsilon = 0.0
        self.rounds_completed = 0
        self._accountant_at_start: tuple[int, list[tuple[Any, ...]]] = (0, [])
        """The accountant (its id) and a copy of its history when the round began."""
        self._counting: tuple[Any, dict[tuple[float, float], int]] | None = None
        """The accountant whose ``step`` this round counts, and its counts per (noise, rate)."""
        self._last_event: SubsampledGaussianEvent | None = None
        self._last_steps = 0
        self._lifetime = lifetime
        self._lifetime_delta = lifetime_delta
        self._model = model
        self._guard: StepGuard | None = None
        """The check that only the engine's noised steps trained the model, kept across rounds (the engine's
        optimizer is one for the site's lifetime); checked in the rounds the loop handed it over."""
        self._guarding = False

    def begin_round(self, params: pb.LocalDpParams) -> None:
        """Note the job's δ and target ε and where the accountant stands before the round's training;
        raise :class:`BudgetExceededError` when the site's ε already reached the job's target."""
        if params.delta > 0:
            self.delta = float(params.delta)
        self.target_epsilon = float(params.target_epsilon)
        self._accountant_at_start = (id(self.engine.accountant), [tuple(entry) for entry in self._history()])
        self._count_steps()
        spent = self.epsilon()
        if self.target_epsilon > 0 and spent >= self.target_epsilon:
            raise BudgetExceededError(party="site", round_index=self.rounds_completed, epsilon_before=spent,
                                      epsilon_after=spent, budget=self.target_epsilon, delta=self.delta)

    def guard(self, model: nn.Module, optimizer: Any) -> None:
        """Watch this round's training as :class:`~fedveil.dp.step_guard.StepGuard` does for ``rnd.privatize``:
        a step of the optimizer the engine wrapped that its accountant did not count (no clipping, no noise),
        or weights that moved after the last counted step, keep the round's update home. Only for the DP
        optimizer the engine returned, and only while this round's steps are counted (:meth:`_count_steps`
        arms the guard at each one)."""
        if self._counting is None or not hasattr(optimizer, "original_optimizer"):
            return
        if self._guard is not None and self._guard.optimizer is optimizer:
            self._guard.restart()
        else:
            self._guard = StepGuard(optimizer, model.parameters(),
                                    remedy="step only the optimizer your make_private call returned")
        self._guarding = True

    def epsilon(self) -> float:
        """ε of the engine's accountant so far (0 before its first step: Opacus's PRV accountant, the
        default of ``make_private_with_epsilon``, fails on an empty history instead)."""
        if not getattr(self.engine.accountant, "history", None):
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.delta))

    def over_budget(self, policy: SitePolicy | None = None) -> str:
        """Why the round just trained may not be released ("" when it may): ε past the job's target, or
        past the site's own ``max_local_epsilon`` when a ``policy`` is given (in every job)."""
        lifetime = over_lifetime(self._lifetime, policy, self._lifetime_delta, self._round_event())
        if lifetime is not None:
            return lifetime_reason(lifetime)
        spent = self.epsilon()
        caps = [c for c in (self.target_epsilon if self.target_epsilon > 0 else None,
                            policy.max_local_epsilon if policy is not None else None) if c is not None]
        if caps and spent > min(caps) * _SLACK:
            return (f"the site's Opacus accountant is at ε = {spent:.3f} (δ = {self.delta:g}), past its "
                    f"budget ε = {min(caps):g} (the job's local target and this site's max_local_epsilon)")
        return ""

    def training_problem(self) -> str:
        """Why the round's weights may not be released ("" when they may): steps its accountant counted as
        Poisson-sampled that were not (:func:`engine_sampling_problem`), or training outside the engine's
        noised steps in a round the loop handed over (:meth:`guard`). A loop's mistake, not the budget."""
        sampling = engine_sampling_problem(self._model) if self._model is not None else ""
        if sampling:
            return sampling
        return self._guard.problem() if self._guard is not None and self._guarding else ""

    def finish_round(self, trained: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The round's steps (from the accountant) as its event; the trained model's state dict."""
        if trained is None:
            raise ValueError("model: the trained model is needed to compute the update")
        self._last_event = self._round_event()
        self._last_steps = self._last_event.steps if self._last_event is not None else 0
        self._stop_counting()
        self._guarding = False
        self.rounds_completed += 1
        return {k: v.detach().clone() for k, v in trained.state_dict().items()}

    @property
    def last_event(self) -> SubsampledGaussianEvent | None:
        return self._last_event

    def spend(self) -> pb.LocalPrivacySpend | None:
        if self.rounds_completed == 0:
            return None
        history = list(getattr(self.engine.accountant, "history", []))
        noise, rate = (float(history[-1][0]), float(history[-1][1])) if history else (0.0, 0.0)
        return pb.LocalPrivacySpend(epsilon=self.epsilon(), delta=self.delta, noise_multiplier=noise,
                                    sample_rate=rate, steps=self._last_steps,
                                    accountant=str(self.engine.accountant.mechanism()))

    def _count_steps(self) -> None:
        """Count the round's accountant steps as they happen (Opacus's optimizer hook calls
        ``accountant.step``), besides reading its history: an accountant whose history the loop cleared,
        then stepped at the same settings as often as before, showed no new steps (the review of this
        session's changes, 2026-12-07)."""
        self._stop_counting()
        accountant = self.engine.accountant
        counts: dict[tuple[float, float], int] = {}
        step = getattr(type(accountant), "step", None)
        if step is None:  # not an Opacus accountant: its history alone counts
            return

        def counting_step(*, noise_multiplier: float, sample_rate: float) -> Any:
            key = (float(noise_multiplier), float(sample_rate))
            counts[key] = counts.get(key, 0) + 1
            if self._guard is not None and self._guarding:  # a real, noised step of the engine's optimizer
                self._guard.arm()
            return step(accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate)

        try:
            accountant.step = counting_step
        except AttributeError:  # an accountant that takes no attributes: its history alone counts
            return
        self._counting = (accountant, counts)

    def _stop_counting(self) -> None:
        if self._counting is not None:
            try:
                del self._counting[0].step
            except AttributeError:
                pass
        self._counting = None

    def _round_event(self) -> SubsampledGaussianEvent | None:
        """The steps the engine took since the round began (None: none), at the highest sample rate and
        the lowest noise multiplier among them.

        Opacus's history has one (noise, rate, steps) entry per change of either, and adds a step at
        unchanged settings to the last entry. A loop that changed them within a round was accounted at
        its last pair for every step (the third reviewer of 2026-12-07: a round's early steps at less
        noise were under-counted). ε grows with the rate and falls with the noise, so the worst pair
        over all the round's steps bounds each of them."""
        segments = self._round_segments()
        counted = [(noise, rate, n) for (noise, rate), n in self._counting[1].items()] if self._counting else []
        if not segments and not counted:
            return None
        both = segments + counted
        return SubsampledGaussianEvent(max(rate for _, rate, _ in both), min(noise for noise, _, _ in both),
                                       max(sum(n for _, _, n in segments), sum(n for _, _, n in counted)))

    def _round_segments(self) -> list[tuple[float, float, int]]:
        """(noise, rate, steps) of each history entry's steps taken since the round began."""
        history = self._history()
        accountant, earlier = self._accountant_at_start
        entries, last_steps = len(earlier), int(earlier[-1][2]) if earlier else 0
        kept = [tuple(entry) for entry in history[:max(entries - 1, 0)]]
        last_grew = entries == 0 or (len(history) >= entries and tuple(history[entries - 1][:2]) == earlier[-1][:2]
                                     and int(history[entries - 1][2]) >= last_steps)
        if id(self.engine.accountant) != accountant or kept != earlier[:max(entries - 1, 0)] or not last_grew:
            # the site replaced or reset its accountant within the round: every step it holds now counts
            # (a reset that then stepped at least as often hid the round's steps: the second review of
            # 2026-12-07)
            entries, last_steps = 0, 0
        segments = []
        for index in range(max(entries - 1, 0), len(history)):
            noise, rate, steps = history[index]
            taken = int(steps) - (last_steps if index == entries - 1 else 0)
            if taken > 0:
                segments.append((float(noise), float(rate), taken))
        return segments

    def _history(self) -> list[Any]:
        return list(getattr(self.engine.accountant, "history", []))

