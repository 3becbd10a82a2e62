"""Federated evaluation metrics: weighted means, and their private form as secure sums.

A site's evaluation of a global model on its own data is a set of means (loss, accuracy, …) over
its examples. Reported one site at a time they are an oracle on its raw data: a server that
crafts "global models" can ask exact counting queries about a site's records. So, by default,
evaluation travels through secure aggregation (Bonawitz et al. 2017): each site appends, per
metric, the pair ``(w, w · value)`` with ``w = min(examples, cap) / cap`` to its masked vector,
and the server decodes only the cohort's sums, ``Σ w · value / Σ w``: the example-weighted mean
over the cohort, never one site's figure.

The section has its own fixed-point scales (one for the weights in [0, 1], one for the weighted
values in [−clip, clip]), each the largest that keeps ``n`` clients' sum inside the ring; it
shares the ring of the update it rides with. Pure: numpy only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedveil.errors import FedveilError

log = logging.getLogger("fedveil.server")

DEFAULT_METRICS = ("loss", "accuracy")
DEFAULT_MAX_EXAMPLES = 1 << 24
"""A site's examples count as at most this many in the cohort's mean."""
DEFAULT_VALUE_CLIP = 1.0e4
TOTAL_BITS = 80
"""Width of one encoded value; sums are rebuilt from their limbs as exact Python integers."""
MAX_METRICS = 32


class EvaluationLayoutError(FedveilError, ValueError):
    """The evaluation section's layout is unusable; the message names the field."""


@dataclass(frozen=True)
class EvaluationLayout:
    """Where and how evaluation sums sit in the masked vector.

    Per metric, a site contributes ``e = min(examples, max_examples)`` and ``e · value`` (value
    clipped to ±``clip``), both as non-negative integers below ``2^80`` — ``e · 2^f`` and
    ``(e · value + max_examples · clip) · 2^f`` — split into ``limbs`` limbs of ``limb_bits``
    bits. Limb sums of ``n`` clients stay below ``2^(k−1)``, so the cohort's sums come out exact.
    """

    metrics: tuple[str, ...]
    value_clip: float
    frac_bits: int
    limb_bits: int
    limbs: int
    max_examples: int
    ring_bits: int

    def __post_init__(self) -> None:
        if not 1 <= len(self.metrics) <= MAX_METRICS or len(set(self.metrics)) != len(self.metrics):
            raise EvaluationLayoutError(f"metrics: 1..{MAX_METRICS} distinct names (got {list(self.metrics)[:5]})")
        if any(not m or len(m) > 64 for m in self.metrics):
            raise EvaluationLayoutError("metrics: names must have 1..64 characters")
        if not (math.isfinite(self.value_clip) and 0 < self.value_clip <= 1e9):
            raise EvaluationLayoutError(f"clip: must be a number in (0, 1e9] (got {self.value_clip!r})")
        if not 8 <= self.ring_bits <= 64:
            raise EvaluationLayoutError(f"ring_bits: must be in 8..64 (got {self.ring_bits})")
        if not 1 <= self.limb_bits < self.ring_bits or not 1 <= self.limbs <= 64:
            raise EvaluationLayoutError(f"limb_bits/limbs: {self.limb_bits}/{self.limbs} do not fit a "
                                        f"{self.ring_bits}-bit ring")
        if not 1 <= self.max_examples <= 1 << 40:
            raise EvaluationLayoutError(f"max_examples: must be in 1..2^40 (got {self.max_examples})")
        width = self._offset_bits()
        if not 0 <= self.frac_bits or width + self.frac_bits > self.limb_bits * self.limbs or \
                width + self.frac_bits > TOTAL_BITS:
            raise EvaluationLayoutError(f"fractional_bits: {self.frac_bits} leaves no room for values up to "
                                        f"2^{width} in {self.limbs} limbs of {self.limb_bits} bits")

    def _offset_bits(self) -> int:
        # e * value + max_examples * clip lies in [0, 2 * max_examples * clip]
        return math.ceil(math.log2(2.0 * self.max_examples * self.value_clip + 1.0))

    @property
    def dimension(self) -> int:
        return 2 * len(self.metrics) * self.limbs

    @classmethod
    def plan(cls, metrics: Sequence[str], cohort_size: int, ring_bits: int, *,
             value_clip: float = DEFAULT_VALUE_CLIP, max_examples: int = DEFAULT_MAX_EXAMPLES) -> EvaluationLayout:
        """Limbs as wide as ``cohort_size`` clients' sums allow, and all remaining bits as fraction."""
        n = max(int(cohort_size), 1)
        limb_bits = ring_bits - 1 - math.ceil(math.log2(n + 1))
        if limb_bits < 1:
            raise EvaluationLayoutError(f"ring_bits: {ring_bits} bits cannot sum {n} clients' evaluation limbs")
        limbs = math.ceil(TOTAL_BITS / limb_bits)
        width = math.ceil(math.log2(2.0 * max_examples * value_clip + 1.0))
        frac = max(0, TOTAL_BITS - width)
        return cls(tuple(metrics), float(value_clip), frac, limb_bits, limbs, int(max_examples), ring_bits)

    def _offset(self) -> int:
        return round(self.max_examples * self.value_clip * 2**self.frac_bits)

    def encode(self, metrics: Mapping[str, float], examples: float, dtype: np.dtype) -> np.ndarray:
        """This site's section; a metric it lacks (or zero examples) contributes ``e = 0``."""
        e = min(max(float(examples), 0.0), float(self.max_examples)) if math.isfinite(float(examples)) else 0.0
        scale = 2**self.frac_bits
        words: list[int] = []
        for name in self.metrics:
            v = metrics.get(name)
            present = v is not None and math.isfinite(float(v)) and e > 0
            ev = e * min(max(float(v), -self.value_clip), self.value_clip) if present else 0.0  # type: ignore[arg-type]
            words.append(round((e if present else 0.0) * scale))
            words.append(round(ev * scale) + self._offset())
        return self._limbs(words).astype(dtype)

    def _limbs(self, words: Sequence[int]) -> np.ndarray:
        mask = (1 << self.limb_bits) - 1
        out = np.empty(len(words) * self.limbs, dtype=np.uint64)
        for i, w in enumerate(words):
            for j in range(self.limbs):
                out[i * self.limbs + j] = (w >> (j * self.limb_bits)) & mask
        return out

    def decode(self, section: np.ndarray, contributors: int) -> tuple[dict[str, float], float]:
        """The cohort's example-weighted means and its total (capped) examples, from the summed
        section of ``contributors`` clients.

        A metric whose sums no ``contributors`` honest sites can produce (examples outside
        [0, contributors · max_examples], or a weighted sum beyond the clip for them) is left out
        and logged: a malicious site may add anything to its section, and one moved a stored cohort
        accuracy to 4.3e7 before this check (third attacker review). The update's sum has its own
        checks (:mod:`fedveil.server.sanity`); a bad evaluation only loses its metric."""
        raw = [int(v) for v in np.asarray(section, dtype=np.uint64).tolist()]
        if len(raw) != self.dimension:
            raise EvaluationLayoutError(f"section: expected {self.dimension} elements (got {len(raw)})")
        words = [sum(raw[i * self.limbs + j] << (j * self.limb_bits) for j in range(self.limbs))
                 for i in range(len(raw) // self.limbs)]
        scale = 2**self.frac_bits
        means: dict[str, float] = {}
        total = 0.0
        n = max(int(contributors), 1)
        for m, name in enumerate(self.metrics):
            e_sum = words[2 * m]
            ev_sum = words[2 * m + 1] - contributors * self._offset()
            # each site rounds e·scale and e·v·scale once (±1/2): the bounds allow that per site
            if e_sum > n * (self.max_examples * scale + 1) or abs(ev_sum) > self.value_clip * (e_sum + n) + n:
                log.warning("secure evaluation: the sums for %r are outside what %d honest sites can produce "
                            "(examples %.6g, weighted sum %.6g); the metric is left out", name, contributors,
                            e_sum / scale, ev_sum / scale)
                continue
            total = max(total, e_sum / scale)
            if e_sum > 0:
                means[name] = ev_sum / e_sum
        return means, total


def weighted_metrics(rows: Sequence[tuple[str, int, Mapping[str, float]]]) -> dict[str, float]:
    """Example-weighted means of per-row metrics (rows: name, examples, metrics); NaNs are skipped."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for _name, n, metrics in rows:
        w = float(max(n, 1))
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                totals[key] = totals.get(key, 0.0) + w * value
                weights[key] = weights.get(key, 0.0) + w
    return {k: totals[k] / weights[k] for k in sorted(totals)}
