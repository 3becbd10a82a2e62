"""Local (sample-level) DP: the site's own DP-SGD noise (Abadi et al. 2016) is in every update it sends.

The ring encoding is the plain one; the noise was added during training, fresh for every training
run, so a replayed global model yields a different update (``fresh_noise_per_release``).
"""

from __future__ import annotations

from fedveil.clients.mechanisms.base import ClientMechanism


class LocalDP(ClientMechanism):
    name = "local"
    fresh_noise_per_release = True
