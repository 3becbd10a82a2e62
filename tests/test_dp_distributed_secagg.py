"""Distributed DP through the real secure-aggregation engine (masking, dropouts, unmasking)."""

from __future__ import annotations

import math

import numpy as np

from fedveil.dp.central import make_generator
from fedveil.dp.clipping import clip_updates
from fedveil.dp.distributed import decode_sum, derive_parameters, derive_rotation_seed, encode_update, sum_encoded
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.simulation import run_round


def test_noised_sum_through_secagg_with_a_dropout() -> None:
    n, dim, clip = 6, 300, 1.0
    dp_config = derive_parameters(n, dim, clip, mechanism="ddg", bits=20, noise_multiplier=1.0)
    secagg = SecAggConfig(num_clients=n, threshold=4, vector_length=dp_config.padded_dim, ring_bits=32, round_id=9)
    seed = derive_rotation_seed(b"test-federation|round-9")
    updates = make_generator(30).normal(size=(n, dim)) / 12
    encoded = encode_update(dp_config, updates, rotation_seed=seed, rng=make_generator(31), ring_bits=32)
    result = run_round(secagg, {cid: encoded[cid] for cid in range(n)}, dropouts={"masked": [5]})
    assert result.result is not None
    survivors = list(result.result.survivors)
    assert survivors == [0, 1, 2, 3, 4]
    decoded = decode_sum(dp_config, result.result.ring_sum, rotation_seed=seed)
    # Exactly what summing the survivors' encodings without masks gives: masks cancel in Z_2^32,
    # and reduction mod 2^20 commutes with it.
    np.testing.assert_array_equal(
        decoded, decode_sum(dp_config, sum_encoded(dp_config, encoded[survivors]), rotation_seed=seed)
    )
    truth = clip_updates(updates[survivors], clip)[0].sum(axis=0)
    sq_err = float(np.sum((decoded - truth) ** 2))
    bound = dp_config.expected_squared_error(len(survivors))
    # Sum of ~D squared near-Gaussian errors: within 6 standard errors of its expectation.
    assert sq_err <= bound * (1 + 6 * math.sqrt(2 / dim))
    # Noise of 5 of 6 shares: the accountant must be told how many contributed.
    assert dp_config.epsilon(1e-5, n_contributors=len(survivors)) > dp_config.epsilon(1e-5)
