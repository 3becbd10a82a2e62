"""Error-correcting reconstruction of Shamir shares: a faulty holder cannot sink the round.

The unmasking stage takes the shares the survivors return and interpolates each secret from t of
them. One holder that returns a wrong share (a malicious site, or one handed a wrong share by a
malicious owner) makes that interpolation give garbage, and plain SecAgg (Bonawitz et al., CCS
2017) then has to abort — so one site could make every attempt of every round fail. Shamir shares
are a Reed–Solomon codeword, though: with N shares of a degree t − 1 polynomial, up to
e = ⌊(N − t)/2⌋ wrong ones can be located and dropped (McEliece and Sarwate, 1981), which the
Berlekamp–Welch algorithm does with one linear solve over GF(p).

All limbs of a secret share the holders, so they are decoded together: the limbs are folded into
one column with random field coefficients drawn *after* the shares arrived (a holder that alters
any limb alters the fold, except with probability 1/p per holder), Berlekamp–Welch locates the
faulty holders on that column, and the secret is interpolated from t of the others.

A wrong share is not caught by the reconstructed limbs leaving their 16-bit range: with small
evaluation points the Lagrange coefficients are small integers, so a holder that adds a small
value to its share shifts the secret by a small value that stays in range. Every secret is
therefore checked against all its shares (:func:`on_one_polynomial`, the code's parity checks,
O(N·(N − t)) per secret) before it is used, and Berlekamp–Welch runs only when that check fails.
With exactly t shares there is nothing to check against: see the threat model.

Pure and deterministic given ``fold``; the server passes fresh OS randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedveil.secagg.errors import SecAggError
from fedveil.secagg.shamir import (
    PRIME,
    differences_products,
    lagrange_at_zero,
    pow_mod,
    random_field_elements,
    reconstruct,
)


class UndecodableSharesError(SecAggError):
    """More holders disagree than N shares can correct (⌊(N − t)/2⌋), or too few shares arrived."""


@dataclass(frozen=True)
class DecodedSecret:
    """A secret's limbs, and the evaluation points (x = holder id + 1) whose shares were wrong."""

    limbs: np.ndarray
    faulty_points: tuple[int, ...]


def _solve_mod_p(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """One solution of ``matrix @ x = rhs`` over GF(p) (free variables 0), or None if there is none."""
    rows, cols = matrix.shape
    aug = np.concatenate([matrix % PRIME, (rhs % PRIME)[:, None]], axis=1).astype(np.int64)
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        if r == rows:
            break
        nonzero = np.flatnonzero(aug[r:, c])
        if nonzero.size == 0:
            continue
        p = r + int(nonzero[0])
        if p != r:
            aug[[r, p]] = aug[[p, r]]
        aug[r] = aug[r] * pow(int(aug[r, c]), PRIME - 2, PRIME) % PRIME
        factors = aug[:, c].copy()
        factors[r] = 0
        aug = (aug - np.outer(factors, aug[r]) % PRIME) % PRIME
        pivots.append(c)
        r += 1
    if np.any(aug[r:, cols]):
        return None
    solution = np.zeros(cols, dtype=np.int64)
    for row, c in enumerate(pivots):
        solution[c] = aug[row, cols]
    return solution


def _powers(xs: np.ndarray, count: int) -> np.ndarray:
    """``(len(xs), count)`` matrix of x^0 .. x^(count−1) mod p."""
    out = np.ones((xs.size, max(count, 0)), dtype=np.int64)
    for j in range(1, count):
        out[:, j] = out[:, j - 1] * xs % PRIME
    return out


def _divide_exact(numerator: np.ndarray, monic: np.ndarray) -> np.ndarray | None:
    """``numerator / monic`` over GF(p) (coefficients low to high), or None if it leaves a remainder."""
    num = [int(v) for v in numerator]
    den = [int(v) for v in monic]
    degree = len(den) - 1
    if len(num) <= degree:
        return None if any(num) else np.zeros(1, dtype=np.int64)
    quotient = [0] * (len(num) - degree)
    for i in range(len(num) - 1, degree - 1, -1):
        coef = num[i] % PRIME
        quotient[i - degree] = coef
        if coef:
            for j in range(degree + 1):
                num[i - degree + j] = (num[i - degree + j] - coef * den[j]) % PRIME
    if any(v % PRIME for v in num[:degree]):
        return None
    return np.asarray(quotient, dtype=np.int64)


def _evaluate(coefficients: np.ndarray, xs: np.ndarray) -> np.ndarray:
    acc = np.zeros(xs.size, dtype=np.int64)
    for c in coefficients[::-1]:
        acc = (acc * xs + int(c)) % PRIME
    return acc


def locate_faulty(xs: np.ndarray, column: np.ndarray, threshold: int) -> tuple[int, ...]:
    """Berlekamp–Welch on one column: the positions whose value is off the degree t − 1 polynomial
    that agrees with all but at most e = ⌊(N − t)/2⌋ of them. Raises if there is no such polynomial."""
    n = xs.size
    errors = (n - threshold) // 2
    if n < threshold:
        raise UndecodableSharesError(f"only {n} shares; threshold is {threshold}")
    # Q(x_i) = y_i·E(x_i), deg Q ≤ t − 1 + e, E monic of degree e: unknowns q_0..q_{t+e−1}, e_0..e_{e−1}
    vander = _powers(xs, threshold + 2 * errors + 1)
    q_part = vander[:, : threshold + errors]
    e_part = (-(column[:, None] * vander[:, :errors]) % PRIME) % PRIME
    rhs = column * vander[:, errors] % PRIME
    solution = _solve_mod_p(np.concatenate([q_part, e_part], axis=1), rhs)
    if solution is None:
        raise UndecodableSharesError(f"more than {errors} of {n} shares are wrong")
    q = solution[: threshold + errors]
    e = np.concatenate([solution[threshold + errors:], np.ones(1, dtype=np.int64)])
    poly = _divide_exact(q, e)
    if poly is None:
        raise UndecodableSharesError(f"more than {errors} of {n} shares are wrong")
    wrong = np.flatnonzero(_evaluate(poly, xs) != column % PRIME)
    if wrong.size > errors:
        raise UndecodableSharesError(f"{wrong.size} of {n} shares are wrong; at most {errors} can be corrected")
    return tuple(int(i) for i in wrong)


def parity_weights(xs: np.ndarray) -> np.ndarray:
    """v_i = 1 / Π_{j≠i} (x_i − x_j) mod p: the column multipliers of the code's dual."""
    return pow_mod(differences_products(xs, 1), PRIME - 2)


def on_one_polynomial(xs: np.ndarray, column: np.ndarray, threshold: int, weights: np.ndarray | None = None) -> bool:
    """Whether the N values lie on one polynomial of degree < t: Σ_i v_i x_i^k y_i = 0 for
    k < N − t (the parity checks of the Reed–Solomon code). Tampering by up to N − t holders, even
    colluding ones that know their true shares, always fails it."""
    x = np.asarray(xs, dtype=np.int64) % PRIME
    v = parity_weights(x) if weights is None else weights
    term = v * (np.asarray(column, dtype=np.int64) % PRIME) % PRIME
    for _ in range(x.size - threshold):
        if int(term.sum()) % PRIME:
            return False
        term = term * x % PRIME
    return True


def fold_limbs(shares: np.ndarray, fold: np.ndarray | None = None) -> np.ndarray:
    """One column Σ_j r_j·limb_j mod p with field coefficients r (fresh from the OS unless given; a
    longer ``fold`` is cut to the L limbs): a holder that alters any limb alters it, except with
    probability 1/p."""
    rows = np.asarray(shares, dtype=np.int64) % PRIME
    weights = (random_field_elements(rows.shape[1]) if fold is None
               else np.asarray(fold, dtype=np.int64)[: rows.shape[1]] % PRIME)
    column = np.zeros(rows.shape[0], dtype=np.int64)
    for j in range(rows.shape[1]):  # L limbs (16 for a 32-byte secret); each product < 2^62
        column = (column + rows[:, j] * weights[j]) % PRIME
    return column


def decode_shares(xs: np.ndarray, shares: np.ndarray, threshold: int, fold: np.ndarray | None = None) -> DecodedSecret:
    """The secret shared as ``shares`` (``(N, L)``, row i at point ``xs[i]``), with up to
    ⌊(N − t)/2⌋ wrong rows located and left out. ``fold``: L field elements that fold the limbs
    into one column (default: fresh from the OS, drawn after the shares arrived)."""
    x = np.asarray(xs, dtype=np.int64)
    rows = np.asarray(shares, dtype=np.int64) % PRIME
    if rows.ndim != 2 or rows.shape[0] != x.size:
        raise UndecodableSharesError(f"shares: expected shape ({x.size}, L) (got {rows.shape})")
    wrong = locate_faulty(x, fold_limbs(rows, fold), threshold)
    good = np.setdiff1d(np.arange(x.size), wrong)[:threshold]
    limbs = reconstruct(x[good], rows[good], lagrange_at_zero(x[good]))
    return DecodedSecret(limbs, tuple(int(x[i]) for i in wrong))
