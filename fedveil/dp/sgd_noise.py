"""DP-SGD's Gaussian noise from an AES-CTR stream instead of torch's Mersenne Twister.

Opacus adds each step's noise with ``torch.normal`` on a ``torch.Generator`` (a Mersenne Twister,
whose state its output reveals), or on torchcsprng's generator in its secure mode; torchcsprng has
no build for this torch. This module keeps Opacus's floating-point-safe construction, each value
the sum of four Gaussians halved (Holohan and Braghin 2021, §5.1, against the attacks of Jin et al.
2021 and Haney et al. 2022), and draws the four from :class:`~fedveil.dp.secure_random.SecureRandom`.
The values are N(0, (z·C)²), the scale the accountant counts. Pure module: the caller supplies the key.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedveil.dp.secure_random import SecureRandom

__all__ = ["SecureSgdNoise", "add_noise_from"]


class SecureSgdNoise:
    """One AES-CTR stream of DP-SGD noise (a round's; the key is never shown)."""

    __slots__ = ("_random",)

    def __init__(self, key: bytes) -> None:
        self._random = SecureRandom(key)

    def __repr__(self) -> str:
        return "SecureSgdNoise(<secret key>)"

    def draw(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std²) noise shaped, typed and placed like ``reference``: four draws summed and halved."""
        if std == 0.0:
            return torch.zeros_like(reference)
        values = self._random.standard_normal((4, reference.numel())).sum(axis=0) * (0.5 * std)
        return torch.from_numpy(values).to(dtype=reference.dtype, device=reference.device).view(reference.shape)


def add_noise_from(optimizer: DPOptimizer, noise: SecureSgdNoise) -> None:
    """Make this optimizer (this instance only: sites that share a process keep their own streams)
    add ``noise``'s draws where Opacus's ``add_noise`` would draw from its generator."""

    def add_noise() -> None:
        std = float(optimizer.noise_multiplier) * float(optimizer.max_grad_norm)
        for param in optimizer.params:
            _check_processed_flag(param.summed_grad)
            param.grad = (param.summed_grad + noise.draw(std, param.summed_grad)).view_as(param)
            _mark_as_processed(param.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[method-assign]
