"""Whether a model's weights moved only through DP-SGD's noised steps.

A site's ledger records the DP-SGD steps its accountant counted. A loop that also trains outside
them (the original optimizer after ``rnd.privatize``, a fine-tuning step after the DP epoch, a second
optimizer) released an update with un-noised steps in it, and a round with no counted step recorded no
event at all: the reported ε did not cover the update (review of 2026-12-07). The guard keeps a copy of
the trainable weights as the DP optimizer's last real step left them (or as the round started), so the
site can refuse to release weights that moved since. Pure module: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["StepGuard"]


class StepGuard:
    """The weights after the DP optimizer's last real step, and the optimizer steps that were not one.

    The DP optimizer wraps the loop's own optimizer, so a loop that calls that optimizer directly steps
    it without clipping or noise: each step is counted as untracked unless the session's step hook
    (:meth:`arm`, run by Opacus only for a real, noised step) announced it."""

    def __init__(self, optimizer: Any, params: Iterable[torch.Tensor],
                 remedy: str = "train with the objects rnd.privatize returns") -> None:
        """``remedy``: what the loop should do instead, said when the guard refuses (:meth:`problem`)."""
        self._params = [p for p in params if p.requires_grad]
        self._snapshot = self._copy()
        self._armed = False
        self.untracked_steps = 0
        self._remedy = remedy
        self.moved_between_steps = 0
        """Noised steps that found the weights moved since the last one (or since the round started)."""
        self.optimizer = optimizer
        inner = optimizer.original_optimizer
        real_step = inner.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._armed and self._moved():  # un-noised training between two noised steps (review of 2026-12-07)
                self.moved_between_steps += 1
            result = real_step(*args, **kwargs)
            if self._armed:
                self._snapshot = self._copy()
                self._armed = False
            else:
                self.untracked_steps += 1
            return result

        inner.step = step

    def restart(self) -> None:
        """A new round on the same optimizer (a site's own engine keeps one): the weights as they are now
        (the round's global model), and no untracked step yet."""
        self._snapshot = self._copy()
        self._armed = False
        self.untracked_steps = 0
        self.moved_between_steps = 0

    def arm(self) -> None:
        """The next step of the wrapped optimizer is a real DP-SGD step (called from the step hook)."""
        self._armed = True

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._params]

    def _moved(self) -> int:
        return sum(1 for p, kept in zip(self._params, self._snapshot, strict=True) if not torch.equal(p.detach(), kept))

    def problem(self) -> str:
        """Why the weights may not be released as DP-SGD's ("" when they may)."""
        if self.untracked_steps:
            return (f"the loop stepped its optimizer {self.untracked_steps} time(s) outside DP-SGD (without "
                    f"clipping or noise): {self._remedy}")
        if self.moved_between_steps:
            return (f"the weights changed outside DP-SGD before {self.moved_between_steps} of its noised step(s) "
                    "(another optimizer, or a change by hand): only DP-SGD's steps are accounted, so nothing else "
                    "may train the model in a local-DP round")
        moved = self._moved()
        if moved:
            return (f"{moved} weight tensor(s) changed after DP-SGD's last noised step (or with none): only "
                    "DP-SGD's steps are accounted, so nothing else may train the model in a local-DP round")
        return ""
