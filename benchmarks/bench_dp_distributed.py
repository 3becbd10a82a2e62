"""Figures for distributed DP (Skellam / DDG) and user-level DP: time per client and at the server.

Run: ``python benchmarks/bench_dp_distributed.py [--dim 1000000] [--clients 100] [--bits 20]``.
Prints one line per measurement and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedveil.dp.central import CentralGaussianMechanism, make_generator
from fedveil.dp.clipping import clip_update
from fedveil.dp.distributed import decode_sum, derive_parameters, encode_update, sum_encoded


def timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    args = parser.parse_args()
    rng = make_generator(0)
    update = rng.normal(size=args.dim) / np.sqrt(args.dim)
    figures: dict[str, float] = {}
    figures["clip_s"] = timed(lambda: clip_update(update, 0.5))
    central = CentralGaussianMechanism(0.5, args.noise_multiplier)
    figures["central_noise_s"] = timed(lambda: central.add_noise(update, rng))
    for mechanism in ("skellam", "ddg"):
        start = time.perf_counter()
        config = derive_parameters(
            args.clients, args.dim, 1.0, mechanism=mechanism, bits=args.bits, target_epsilon=5.0, delta=1e-6,
            rounds=100,
        )
        figures[f"{mechanism}_derive_target_eps_s"] = time.perf_counter() - start
        encoded = encode_update(config, update, rotation_seed=1, rng=rng)
        figures[f"{mechanism}_encode_s"] = timed(lambda c=config: encode_update(c, update, rotation_seed=1, rng=rng))
        ring_sum = sum_encoded(config, np.stack([encoded, encoded]))
        figures[f"{mechanism}_decode_s"] = timed(lambda c=config, r=ring_sum: decode_sum(c, r, rotation_seed=1))
        figures[f"{mechanism}_noise_multiplier_equiv"] = config.effective_noise_multiplier()
        figures[f"{mechanism}_norm_inflation"] = config.norm_inflation
    for key, value in figures.items():
        print(f"{key:32s} {value:.4g}")
    print(json.dumps({"dim": args.dim, "clients": args.clients, "bits": args.bits, **figures}))


if __name__ == "__main__":
    main()
