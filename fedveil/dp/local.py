"""Local (sample-level) DP-SGD for one client across federated rounds, on top of Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips each example's gradient to
``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier × max_grad_norm`` to the sum of a
Poisson-sampled batch. In federated learning a client trains a few local steps per round for many
rounds, so the privacy of its records degrades over *all* rounds it joins. Hence one
:class:`LocalDPSession` per client, created once, holding ONE accountant for the client's lifetime:
each round it privatizes the user's own model, optimizer and data loader with Opacus's front door
(``PrivacyEngine.make_private``), counts the noisy optimizer steps actually taken (through the
``DPOptimizer`` step hook), and composes them into that accountant at :meth:`finish_round`.

Usage (the client library and the demo call it this way)::

    session = LocalDPSession(LocalDPConfig(max_grad_norm=1.0, target_epsilon=3.0, planned_rounds=10))
    for each round:
        model.load_state_dict(global_state)
        model, optimizer, loader = session.privatize(model, optimizer, loader)
        ...  # the user's ordinary training loop over ``loader``
        state = session.finish_round(model)     # plain state dict: no ``_module.`` prefix
        session.epsilon()                       # sample-level ε so far

Noise: a fixed ``noise_multiplier``, or a ``target_epsilon`` over ``planned_rounds`` × ``local_epochs``
epochs, solved ONCE at the first round for the whole plan (re-solving per round would let ε drift).
Budget: the target, and ``epsilon_budget`` (a cap in either mode, e.g. the site's own policy), whichever
is tighter. Each round is checked against it with the steps that round really takes: its own
``local_epochs`` (``privatize(..., local_epochs=...)``) times the batches of the loader it is given
(so a new batch size or data size counts too), never the plan's first-round figures; the steps
actually taken so far are in :meth:`LocalDPSession.pending_epsilon`, for a check before release.
Randomness: without a ``seed``, Poisson sampling takes a fresh OS-seeded generator each round and the
noise an AES-CTR stream under a fresh OS key each round (:mod:`fedveil.dp.sgd_noise`, robust to
floating-point attacks: four Gaussians summed and halved); ``seed`` makes both reproducible (derived
from (seed, round), for tests and simulation). ``secure_mode=True`` leaves both to Opacus's CSPRNG
(needs ``torchcsprng``).
With a budget, :meth:`privatize` refuses (``BudgetExceededError``) a round that would take ε past it;
:meth:`plan_round` says what a round would cost without wrapping anything. Pass the ORIGINAL data
loader each round; Poisson sampling (sample rate 1 / len(loader)) and, optionally, a physical batch cap
via Opacus's ``BatchMemoryManager`` are applied here.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, default_collate

from fedveil.dp.accounting import (
    ACCOUNTANTS,
    DpEvent,
    PrivacyAccountant,
    SubsampledGaussianEvent,
    check_delta,
    make_accountant,
)
from fedveil.dp.calibration import solve_noise_multiplier
from fedveil.dp.compat import UnsupportedLayerError, make_dp_compatible
from fedveil.dp.ledger import BUDGET_REL_TOLERANCE, BudgetExceededError
from fedveil.dp.sgd_noise import SecureSgdNoise, add_noise_from
from fedveil.dp.step_guard import StepGuard


@dataclass(frozen=True)
class LocalDPConfig:
    """Configuration of one client's DP-SGD over the whole federation run.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is set; ``target_epsilon`` needs
    ``planned_rounds``. ``local_epochs`` is the planned number of passes over the data per round (used
    to plan the noise, and for a round that gives none of its own; the accountant counts the steps
    actually taken). ``epsilon_budget`` caps the ε the session spends (at ``delta``) in either mode;
    with a target, the tighter of the two holds.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_rounds: int | None = None
    local_epochs: int = 1
    delta: float = 1e-5
    accountant: str = "rdp"
    max_physical_batch_size: int | None = None
    fix_unsupported_layers: bool = True
    seed: int | None = None
    secure_mode: bool = False
    client_id: str = "client"
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        if not _is_pos_number(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be a finite number > 0 (got {self.max_grad_norm!r})")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (
            _is_number(self.noise_multiplier) and self.noise_multiplier >= 0.0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0 (got {self.noise_multiplier!r})")
        if self.target_epsilon is not None:
            if not _is_pos_number(self.target_epsilon):
                raise ValueError(f"target_epsilon must be a finite number > 0 (got {self.target_epsilon!r})")
            if not _is_pos_int(self.planned_rounds):
                raise ValueError(
                    f"planned_rounds must be an integer >= 1 when target_epsilon is set (got {self.planned_rounds!r})"
                )
        if not _is_pos_int(self.local_epochs):
            raise ValueError(f"local_epochs must be an integer >= 1 (got {self.local_epochs!r})")
        check_delta(self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")
        if self.secure_mode and self.seed is not None:
            raise ValueError("seed cannot be combined with secure_mode (secure noise comes from the OS CSPRNG)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None (got {self.seed!r})")
        if self.max_physical_batch_size is not None and not _is_pos_int(self.max_physical_batch_size):
            raise ValueError(
                f"max_physical_batch_size must be an integer >= 1 or None (got {self.max_physical_batch_size!r})"
            )
        if self.epsilon_budget is not None and not _is_pos_number(self.epsilon_budget):
            raise ValueError(f"epsilon_budget must be a finite number > 0 or None (got {self.epsilon_budget!r})")

    @property
    def budget(self) -> float | None:
        """The ε this session may spend at ``delta``: the target and ``epsilon_budget``, the tighter (None: no cap)."""
        caps = [c for c in (self.target_epsilon, self.epsilon_budget) if c is not None]
        return min(caps) if caps else None


@dataclass(frozen=True)
class RoundPlan:
    """What one round of DP-SGD would cost, from the steps it really takes (:meth:`LocalDPSession.plan_round`)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    """``local_epochs`` × the loader's Poisson batches per epoch."""
    epsilon_before: float
    epsilon_after: float
    """ε (at ``delta``) once the round's steps are composed with every earlier round's."""
    delta: float
    budget: float | None


class PhysicalBatchLoader:
    """Iterates a Poisson-sampled loader in physical batches of at most ``max_physical_batch_size``.

    Each pass enters Opacus's ``BatchMemoryManager``, which splits every logical (Poisson) batch and tells
    the ``DPOptimizer`` to take a real, noised step only at the last physical piece — so privacy
    accounting is per logical batch, exactly as without the cap.
    """

    def __init__(self, loader: DataLoader, optimizer: DPOptimizer, max_physical_batch_size: int) -> None:
        self.loader = loader
        self.optimizer = optimizer
        self.max_physical_batch_size = max_physical_batch_size

    def __iter__(self) -> Iterator[Any]:
        with BatchMemoryManager(
            data_loader=self.loader, max_physical_batch_size=self.max_physical_batch_size, optimizer=self.optimizer
        ) as physical:
            yield from physical

    def __len__(self) -> int:
        with BatchMemoryManager(
            data_loader=self.loader, max_physical_batch_size=self.max_physical_batch_size, optimizer=self.optimizer
        ) as physical:
            return len(physical)


class LocalDPSession:
    """One client's DP-SGD across rounds: privatize → train → :meth:`finish_round`, one accountant."""

    def __init__(self, config: LocalDPConfig) -> None:
        self.config = config
        self.accountant: PrivacyAccountant = make_accountant(config.accountant)
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sample_rate: float | None = None
        self.rounds_completed = 0
        self.round_events: list[SubsampledGaussianEvent] = []
        self.resumed_events = 0
        """Events of an earlier process composed in by :meth:`resume`."""
        try:
            # The engine's own accountant is unused: ours is attached to each optimizer's step hook.
            with warnings.catch_warnings():
                # Opacus's advice to retrain with its secure mode: this session draws its own noise
                # (AES-CTR, floating-point safe; see privatize and fedveil.dp.sgd_noise)
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                self._engine = PrivacyEngine(accountant="rdp", secure_mode=config.secure_mode)
        except ImportError as err:
            raise ImportError(
                "LocalDPConfig.secure_mode=True needs Opacus's secure RNG, which needs the torchcsprng package: "
                f"{err}"
            ) from err
        self._active: GradSampleModule | None = None
        self._round_steps = 0
        self._round_sample_rate: float | None = None
        self._round_noise: float | None = None
        self.step_guard: StepGuard | None = None
        """This round's check that only DP-SGD's steps trained the model (:mod:`fedveil.dp.step_guard`)."""

    # -- the round ----------------------------------------------------------------------------------
    def privatize(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader | PhysicalBatchLoader,
        *, local_epochs: int | None = None,
    ) -> tuple[GradSampleModule, DPOptimizer, DataLoader | PhysicalBatchLoader]:
        """Wrap the user's objects for one round of DP-SGD. Returns ``(model, optimizer, loader)`` to train
        with exactly as before. ``local_epochs``: the passes this round takes (default: the config's).
        Raises ``BudgetExceededError`` if this round's steps (its epochs × the loader's batches) would
        take ε past the budget, and :class:`UnsupportedLayerError` for layers that cannot be fixed."""
        if self._active is not None:
            raise RuntimeError("finish_round() must be called before privatize() starts the next round")
        if isinstance(loader, PhysicalBatchLoader):
            loader = loader.loader
        if isinstance(model, GradSampleModule):
            model = model._module
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        if not isinstance(loader, DataLoader):
            raise TypeError(f"loader must be a torch DataLoader (got {type(loader).__name__})")
        epochs = self._round_epochs(local_epochs)
        steps_per_epoch = _steps_per_epoch(loader)
        self._check_plan(self._plan(steps_per_epoch, epochs))  # this round's own steps, before anything is wrapped
        model, optimizer = self._make_compatible(model, optimizer)

        dp_loader = DPDataLoader.from_data_loader(loader, generator=self._sampling_generator())
        _template_empty_batches(dp_loader, loader)
        if len(dp_loader) != steps_per_epoch:  # the same construction: never expected
            raise RuntimeError("the Poisson loader's length changed between planning and wrapping")

        private_model, private_opt, private_loader = self._engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=dp_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=False,  # dp_loader already samples Poisson with our generator
            noise_generator=None,  # the noise: add_noise_from below, or Opacus's CSPRNG in secure mode
        )
        private_model.forbid_grad_accumulation()
        if not self.config.secure_mode:  # every noise value from AES-CTR, floating-point safe
            add_noise_from(private_opt, SecureSgdNoise(self._round_noise_key()))
        self.step_guard = StepGuard(private_opt, private_model.parameters())
        private_opt.attach_step_hook(self._step_hook(1.0 / len(private_loader)))
        self._active = private_model
        self._round_steps = 0
        self._round_sample_rate = None
        self._round_noise = None
        if self.config.max_physical_batch_size is not None:
            return private_model, private_opt, PhysicalBatchLoader(
                private_loader, private_opt, self.config.max_physical_batch_size
            )
        return private_model, private_opt, private_loader

    def finish_round(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Account the round's noisy steps, detach Opacus from the model and return a plain state dict."""
        if self._active is None:
            raise RuntimeError("finish_round() called without a privatize() for this round")
        wrapped = self._active
        if model is not wrapped and model is not wrapped._module:
            raise ValueError("finish_round() needs the model returned by privatize() for this round")
        if self._round_steps > 0:
            assert self._round_sample_rate is not None and self._round_noise is not None
            event = SubsampledGaussianEvent(self._round_sample_rate, self._round_noise, self._round_steps)
            self.accountant.compose(event)
            self.round_events.append(event)
            self.sample_rate = self._round_sample_rate
        state = {k: v.detach().clone() for k, v in wrapped._module.state_dict().items()}
        wrapped._close()
        self._active = None
        self.rounds_completed += 1
        return state

    def resume(self, earlier: Sequence[DpEvent]) -> None:
        """Compose DP-SGD steps this client took before the session began (an earlier process of the same
        job, from the site's saved ledger) into its accountant, before its first round: the budget
        checks and :meth:`epsilon` then cover them too. They are not rounds of this session."""
        if self.rounds_completed or self._active is not None:
            raise RuntimeError("resume() must come before the session's first round")
        for event in earlier:
            if not isinstance(event, SubsampledGaussianEvent):
                raise TypeError(f"earlier DP-SGD steps must be SubsampledGaussianEvents (got {type(event).__name__})")
            self.accountant.compose(event)
        self.resumed_events = len(earlier)

    @property
    def last_round_event(self) -> SubsampledGaussianEvent | None:
        """The round's sample-level event, for the federation's :class:`~fedveil.dp.ledger.PrivacyLedger`."""
        return self.round_events[-1] if self.round_events else None

    def epsilon(self, delta: float | None = None) -> float:
        """Sample-level ε spent by this client so far (all rounds)."""
        return self.accountant.get_epsilon(self.config.delta if delta is None else delta)

    def plan_round(self, loader: DataLoader | PhysicalBatchLoader, *, local_epochs: int | None = None) -> RoundPlan:
        """What a round over ``loader`` for ``local_epochs`` passes (default: the config's) would cost,
        without wrapping anything or checking the budget (in target mode the noise is solved here, once)."""
        if isinstance(loader, PhysicalBatchLoader):
            loader = loader.loader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"loader must be a torch DataLoader (got {type(loader).__name__})")
        return self._plan(_steps_per_epoch(loader), self._round_epochs(local_epochs))

    def pending_event(self) -> SubsampledGaussianEvent | None:
        """The steps the current round took so far, as :meth:`finish_round` will account them (None: none)."""
        if self._active is None or self._round_steps == 0:
            return None
        assert self._round_sample_rate is not None and self._round_noise is not None
        return SubsampledGaussianEvent(self._round_sample_rate, self._round_noise, self._round_steps)

    def pending_epsilon(self, delta: float | None = None) -> float:
        """ε (at ``delta``, default the config's) once the steps the current round took so far are composed:
        what :meth:`finish_round` will account, known before the round's update is released."""
        d = self.config.delta if delta is None else delta
        event = self.pending_event()
        return self.accountant.get_epsilon(d) if event is None else self.accountant.epsilon_after([event], d)

    # -- internals ----------------------------------------------------------------------------------
    def _sampling_generator(self) -> Any:
        """The generator of this round's Poisson sampling: fresh OS entropy each round, never torch's
        global generator (a process that shares it, such as an in-process simulation or user code calling
        torch.manual_seed, could predict the batches); with a seed, derived from (seed, round); in secure
        mode Opacus's CSPRNG, which then draws the noise too."""
        if self.config.secure_mode:
            return self._engine.secure_rng
        seed = self.config.seed
        sampling = _fresh_seed() if seed is None else _derive_seed(seed, "sampling", self.rounds_completed)
        return torch.Generator().manual_seed(sampling)

    def _round_noise_key(self) -> bytes:
        """The AES key of this round's DP-SGD noise: fresh from the OS, or derived from (seed, round)."""
        if self.config.seed is None:
            return os.urandom(32)
        return _derive_digest(self.config.seed, "noise", self.rounds_completed)

    def _step_hook(self, sample_rate: float) -> Callable[[DPOptimizer], None]:
        """Hook run by the DPOptimizer after each noised (real) step — the same place and the same q
        (1/len(Poisson loader) × accumulated iterations) as Opacus's own accountant hook."""

        def hook(optimizer: DPOptimizer) -> None:
            q = sample_rate * int(optimizer.accumulated_iterations)
            z = float(optimizer.noise_multiplier)
            if self._round_sample_rate is not None and (q != self._round_sample_rate or z != self._round_noise):
                raise RuntimeError("sample rate or noise multiplier changed within a round")
            self._round_sample_rate, self._round_noise = q, z
            self._round_steps += 1
            if self.step_guard is not None:
                self.step_guard.arm()

        return hook

    def _plan_noise(self, sample_rate: float, steps_per_epoch: int) -> float:
        cfg = self.config
        assert cfg.target_epsilon is not None and cfg.planned_rounds is not None
        total = cfg.planned_rounds * cfg.local_epochs * steps_per_epoch
        solution = solve_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            sample_rate=sample_rate,
            steps=total,
            accountant=cfg.accountant,
        )
        return solution.noise_multiplier

    def _round_epochs(self, local_epochs: int | None) -> int:
        if local_epochs is None:
            return self.config.local_epochs
        if not _is_pos_int(local_epochs):
            raise ValueError(f"local_epochs must be an integer >= 1 (got {local_epochs!r})")
        return local_epochs

    def _plan(self, steps_per_epoch: int, local_epochs: int) -> RoundPlan:
        """The round's cost with its own epochs and the loader's batches (the noise solved once, at the first
        round, for the config's plan)."""
        if steps_per_epoch < 1:
            raise ValueError("the data loader is empty")
        sample_rate = 1.0 / steps_per_epoch
        if self.noise_multiplier is None:
            self.noise_multiplier = self._plan_noise(sample_rate, steps_per_epoch)
        cfg = self.config
        planned = SubsampledGaussianEvent(sample_rate, self.noise_multiplier, local_epochs * steps_per_epoch)
        return RoundPlan(
            noise_multiplier=self.noise_multiplier,
            sample_rate=sample_rate,
            steps=planned.steps,
            epsilon_before=self.accountant.get_epsilon(cfg.delta),
            epsilon_after=self.accountant.epsilon_after([planned], cfg.delta),
            delta=cfg.delta,
            budget=cfg.budget,
        )

    def _check_plan(self, plan: RoundPlan) -> None:
        if plan.budget is None:
            return
        if not plan.epsilon_after <= plan.budget * (1.0 + BUDGET_REL_TOLERANCE):
            raise BudgetExceededError(
                party=self.config.client_id,
                round_index=self.rounds_completed,
                epsilon_before=plan.epsilon_before,
                epsilon_after=plan.epsilon_after,
                budget=plan.budget,
                delta=plan.delta,
            )

    def _make_compatible(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        errors = ModuleValidator.validate(model, strict=False)
        if not errors:
            return model, optimizer
        summary = _summarize(errors)
        if not self.config.fix_unsupported_layers:
            raise UnsupportedLayerError(
                f"the model has layers DP-SGD cannot train: {summary}. Replace them (e.g. BatchNorm → GroupNorm) "
                "or set fix_unsupported_layers=True"
            )
        fixed = make_dp_compatible(model)
        if len(optimizer.param_groups) != 1:
            raise UnsupportedLayerError(
                f"the model has layers DP-SGD cannot train: {summary}. Fixing them replaces parameters, and an "
                "optimizer with several parameter groups cannot be rebuilt automatically: call "
                "fedveil.dp.local.make_dp_compatible(model) before creating the optimizer"
            )
        warnings.warn(
            f"DP-SGD: replaced unsupported layers ({summary}) with Opacus's fixes. The model's architecture "
            "changed; apply fedveil.dp.local.make_dp_compatible() to the global model too so state dicts "
            "match, and create the optimizer after fixing to keep its state",
            UserWarning,
            stacklevel=3,
        )
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        rebuilt = type(optimizer)(fixed.parameters(), **group)
        return fixed, rebuilt


def _template_empty_batches(dp_loader: DataLoader, loader: DataLoader) -> None:
    """Give Opacus's empty-batch collate the structure of the user's batches before the first one.

    Poisson sampling can draw an empty batch. Opacus then returns an empty batch shaped like the
    first batch it collated; an empty *first* batch falls back to a plain list, which breaks a loop
    whose batches are dicts or tuples. Seeding the template with one collated sample keeps the
    user's structure (tuples, dicts, lists of tensors); only its shapes and dtypes are used (0 rows),
    so no record leaves through it.
    """
    collate = dp_loader.collate_fn
    if getattr(collate, "first_batch", False) is None and len(loader.dataset) > 0:  # type: ignore[arg-type]
        user_collate = loader.collate_fn or default_collate
        collate.first_batch = user_collate([loader.dataset[0]])  # type: ignore[union-attr]


def _steps_per_epoch(loader: DataLoader) -> int:
    """The Poisson batches (noised steps) per pass over ``loader``, as Opacus's ``DPDataLoader`` draws them."""
    if len(loader) < 1:  # type: ignore[arg-type]
        raise ValueError("the data loader is empty")
    return len(DPDataLoader.from_data_loader(loader))


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove Opacus's ``_module.`` wrapper prefix from state-dict keys."""
    prefix = "_module."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _derive_digest(seed: int, purpose: str, round_index: int) -> bytes:
    """32 bytes for one purpose and round, derived from the session seed by SHA-256."""
    return hashlib.sha256(f"fedveil.dp.local|{seed}|{purpose}|{round_index}".encode()).digest()


def _derive_seed(seed: int, purpose: str, round_index: int) -> int:
    """A 63-bit seed for one purpose and round (:func:`_derive_digest`)."""
    return int.from_bytes(_derive_digest(seed, purpose, round_index)[:8], "little") >> 1


def _fresh_seed() -> int:
    """A 63-bit generator seed from the OS CSPRNG."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def _summarize(errors: list[Any]) -> str:
    """First sentence of each Opacus validator error, deduplicated (the full texts are paragraphs)."""
    firsts = [str(e).strip().split(". ")[0].rstrip(".") for e in errors]
    return "; ".join(dict.fromkeys(firsts))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_pos_number(x: Any) -> bool:
    return _is_number(x) and x > 0


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
