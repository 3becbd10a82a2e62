"""The healthcare demo's data: WDBC (breast-cancer diagnosis) split across hospitals.

The Wisconsin Diagnostic Breast Cancer data (569 fine-needle aspirates, 30 nuclear
features, Street, Wolberg and Mangasarian, 1993) ships with scikit-learn, so the demo needs
no download. The label is ``malignant`` (1) or benign (0); note scikit-learn's own target is
the opposite (0 = malignant), which is flipped here so that the model predicts risk.

The split is fixed by a seed (:data:`DEMO_SPLIT_SEED`) and made once, before anything is trained:

* a **test set** (20 %, stratified) that only the final evaluation and the per-round
  monitoring look at; no choice of the recipe is ever made on it;
* a **validation set** held by the coordinator: one of five stratified folds of the remaining
  patients (16 % of all). The recipe was tuned by cross-validation over these five folds
  (each fold in turn held out, the other four spread across the hospitals), never on the
  test set (see :mod:`fedveil.demo.tuning`);
* the other four folds (64 %) spread across the hospitals **non-IID**: sizes fall geometrically (the
  largest hospital holds roughly four times as many patients as the smallest) and the share
  of malignant cases differs from hospital to hospital (from about one in six to about two in
  three), as it would between a screening clinic and a referral centre.

Features are scaled by fixed **public reference ranges** rather than statistics of anyone's
data. A federation cannot compute a pooled mean and standard deviation without spending
privacy on them, and per-site standardization breaks under label skew: at a referral centre
where most patients are malignant, the site's own mean already looks "malignant", so the same
tumour would be scaled differently at each hospital. The ranges used here are the published
minimum and maximum of each measurement from the dataset's documentation (the UCI description,
reproduced in scikit-learn's ``DESCR``): a public fact that every site can read without seeing
any other site's patients, like a lab's documented measurement range. They are widened by 10 %
on each side so that a new patient slightly outside them still maps to a sensible value; values
further out are not clipped (the model is linear and sees them as more extreme, which is what
they are). The scaling is built into the model as a fixed, non-trainable first layer, so site
CSV files, ``fedveil client --data`` and the clinician page all use raw clinical units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: (name in the CSV, published min, published max, description): the WDBC documentation's
#: summary statistics, in the model's feature order (scikit-learn's order).
_PUBLIC_RANGES: tuple[tuple[str, float, float, str], ...] = (
    ("mean_radius", 6.981, 28.11, "mean distance from centre to perimeter points"),
    ("mean_texture", 9.71, 39.28, "standard deviation of grey-scale values"),
    ("mean_perimeter", 43.79, 188.5, "nucleus perimeter"),
    ("mean_area", 143.5, 2501.0, "nucleus area"),
    ("mean_smoothness", 0.053, 0.163, "local variation in radius lengths"),
    ("mean_compactness", 0.019, 0.345, "perimeter^2 / area - 1"),
    ("mean_concavity", 0.0, 0.427, "severity of concave portions of the contour"),
    ("mean_concave_points", 0.0, 0.201, "number of concave portions of the contour"),
    ("mean_symmetry", 0.106, 0.304, "symmetry"),
    ("mean_fractal_dimension", 0.05, 0.097, "coastline approximation - 1"),
    ("radius_error", 0.112, 2.873, "standard error of the radius"),
    ("texture_error", 0.36, 4.885, "standard error of the texture"),
    ("perimeter_error", 0.757, 21.98, "standard error of the perimeter"),
    ("area_error", 6.802, 542.2, "standard error of the area"),
    ("smoothness_error", 0.002, 0.031, "standard error of the smoothness"),
    ("compactness_error", 0.002, 0.135, "standard error of the compactness"),
    ("concavity_error", 0.0, 0.396, "standard error of the concavity"),
    ("concave_points_error", 0.0, 0.053, "standard error of the concave points"),
    ("symmetry_error", 0.008, 0.079, "standard error of the symmetry"),
    ("fractal_dimension_error", 0.001, 0.03, "standard error of the fractal dimension"),
    ("worst_radius", 7.93, 36.04, "mean of the three largest radii"),
    ("worst_texture", 12.02, 49.54, "mean of the three largest textures"),
    ("worst_perimeter", 50.41, 251.2, "mean of the three largest perimeters"),
    ("worst_area", 185.2, 4254.0, "mean of the three largest areas"),
    ("worst_smoothness", 0.071, 0.223, "mean of the three largest smoothness values"),
    ("worst_compactness", 0.027, 1.058, "mean of the three largest compactness values"),
    ("worst_concavity", 0.0, 1.252, "mean of the three largest concavity values"),
    ("worst_concave_points", 0.0, 0.291, "mean of the three largest concave-point counts"),
    ("worst_symmetry", 0.156, 0.664, "mean of the three largest symmetry values"),
    ("worst_fractal_dimension", 0.055, 0.208, "mean of the three largest fractal dimensions"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(r[0] for r in _PUBLIC_RANGES)
FEATURE_DESCRIPTIONS: dict[str, str] = {r[0]: r[3] for r in _PUBLIC_RANGES}
LABEL_NAME = "malignant"
RANGE_MARGIN = 0.10

TEST_FRACTION = 0.20
#: Hospital sizes fall by this factor from one hospital to the next (before rounding).
SIZE_DECAY = 0.72
#: The share of malignant cases runs between these two values across hospitals, then is
#: rescaled so that the hospitals together hold exactly the pool's malignant cases.
MALIGNANT_SHARE_RANGE = (0.15, 0.65)


def public_ranges() -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (low, high) reference bounds: the published range widened by 10 % each side."""
    lo = np.array([r[1] for r in _PUBLIC_RANGES], dtype=np.float64)
    hi = np.array([r[2] for r in _PUBLIC_RANGES], dtype=np.float64)
    pad = RANGE_MARGIN * (hi - lo)
    return (lo - pad), (hi + pad)


def load_wdbc() -> tuple[np.ndarray, np.ndarray]:
    """All 569 patients: float32 features in raw clinical units, float32 labels (1 = malignant)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = (np.asarray(bunch.target) == 0).astype(np.float32)  # sklearn: 0 = malignant
    if x.shape[1] != len(FEATURE_NAMES):
        raise RuntimeError(f"unexpected WDBC shape {x.shape}; expected {len(FEATURE_NAMES)} features")
    return x, y


@dataclass(frozen=True)
class Site:
    """One hospital's patients (raw units)."""

    name: str
    features: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def malignant_share(self) -> float:
        return float(self.labels.mean()) if self.size else 0.0


@dataclass(frozen=True)
class DemoSplit:
    """The fixed split: hospitals (training), the coordinator's validation set, the test set."""

    hospitals: tuple[Site, ...]
    validation: Site
    test: Site
    seed: int

    @property
    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """All hospitals' data pooled: only the centralized baseline may use this."""
        x = np.concatenate([h.features for h in self.hospitals])
        y = np.concatenate([h.labels for h in self.hospitals])
        return x, y


def hospital_name(index: int) -> str:
    return f"hospital-{index + 1}"


def _stratified_take(rng: np.random.Generator, idx: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    taken: list[np.ndarray] = []
    for cls in (0.0, 1.0):
        members = idx[y[idx] == cls]
        members = members[rng.permutation(len(members))]
        taken.append(members[: round(fraction * len(members))])
    return np.sort(np.concatenate(taken))


def hospital_plan(n_hospitals: int, n_total: int, n_malignant: int) -> list[tuple[int, int]]:
    """(patients, malignant patients) per hospital: geometric sizes, a spread of label mixes.

    Deterministic; the counts add up exactly to ``n_total`` and ``n_malignant``, each hospital
    gets at least 4 patients with at least one case of each class, so every site can train.
    """
    if n_hospitals < 1:
        raise ValueError(f"hospitals must be at least 1 (got {n_hospitals})")
    if n_total < 4 * n_hospitals:
        raise ValueError(f"{n_total} training patients are too few for {n_hospitals} hospitals (need 4 each)")
    weights = SIZE_DECAY ** np.arange(n_hospitals)
    sizes = np.maximum(4, np.floor(weights / weights.sum() * n_total)).astype(int)
    i = 0
    while sizes.sum() < n_total:  # hand out the rounding remainder, largest first
        sizes[i % n_hospitals] += 1
        i += 1
    while sizes.sum() > n_total:
        j = int(np.argmax(sizes))
        sizes[j] -= 1
    lo, hi = MALIGNANT_SHARE_RANGE
    # Alternate low and high shares so that size and label mix are not simply correlated.
    shares = np.linspace(lo, hi, n_hospitals) if n_hospitals > 1 else np.array([n_malignant / n_total])
    order = np.array([*range(0, n_hospitals, 2), *range(1, n_hospitals, 2)])
    shares = shares[np.argsort(order)]
    shares = shares * (n_malignant / float((shares * sizes).sum()))
    mal = np.clip(np.round(shares * sizes), 1, sizes - 1).astype(int)
    # Fix the total by moving cases where there is room, preferring the hospitals furthest off.
    step = 0
    while mal.sum() != n_malignant:
        step += 1
        if step > 10 * n_total:
            raise ValueError("cannot spread the malignant cases across hospitals")
        diff = n_malignant - mal.sum()
        room = (sizes - 1 - mal) if diff > 0 else (mal - 1)
        gap = (shares * sizes - mal) * (1 if diff > 0 else -1)
        gap = np.where(room > 0, gap, -np.inf)
        j = int(np.argmax(gap))
        mal[j] += 1 if diff > 0 else -1
    return [(int(s), int(m)) for s, m in zip(sizes, mal, strict=True)]


N_FOLDS = 5

#: The demo's split. Seed 0 was the first draw; it turned out to be an outlier (over 200 splits
#: drawn the same way, a centralized non-private logistic regression's test ROC AUC has median
#: 0.997 and seed 0 sits at the 1st percentile, 0.976-0.980), so a single 113-patient test set
#: drawn with it cannot show what the recipe does on a typical split. The protocol, fixed before
#: anything was evaluated on any other split: the demo moves to the next seed, 1, whatever it
#: gives; the recipe's finalists are re-selected by cross-validation on seed 1's non-test
#: patients (the original search used seed 0's, which overlap seed 1's test set); and
#: ``benchmarks/demo_utility.py`` reports the recipe on the test sets of seeds 0-9, so that
#: no single split, lucky or not, stands for the recipe. Seed 0's figures stay in docs/demo.md.
DEMO_SPLIT_SEED = 1


def make_split(n_hospitals: int = 5, seed: int = DEMO_SPLIT_SEED, fold: int = 0) -> DemoSplit:
    """Split WDBC into a test set, a validation set and ``n_hospitals`` non-IID hospitals.

    The test set depends only on ``seed``. The remaining patients are cut into
    :data:`N_FOLDS` stratified folds; fold ``fold`` is the validation set and the other folds
    are spread across the hospitals. Tuning cross-validates over all folds; the demo uses
    fold 0. :data:`DEMO_SPLIT_SEED` is the demo's split.
    """
    if not 0 <= fold < N_FOLDS:
        raise ValueError(f"fold must be in 0..{N_FOLDS - 1} (got {fold})")
    x, y = load_wdbc()
    rng = np.random.default_rng(seed)
    all_idx = np.arange(len(y))
    test_idx = _stratified_take(rng, all_idx, y, TEST_FRACTION)
    rest = np.setdiff1d(all_idx, test_idx)
    folds = _stratified_folds(rng, rest, y, N_FOLDS)
    val_idx = folds[fold]
    pool = np.setdiff1d(rest, val_idx)
    pos = pool[y[pool] == 1.0]
    neg = pool[y[pool] == 0.0]
    pos = pos[rng.permutation(len(pos))]
    neg = neg[rng.permutation(len(neg))]
    plan = hospital_plan(n_hospitals, len(pool), len(pos))
    sites: list[Site] = []
    p_at = n_at = 0
    for i, (size, n_mal) in enumerate(plan):
        idx = np.concatenate([pos[p_at : p_at + n_mal], neg[n_at : n_at + size - n_mal]])
        p_at += n_mal
        n_at += size - n_mal
        idx = idx[rng.permutation(len(idx))]
        sites.append(Site(hospital_name(i), x[idx], y[idx]))
    return DemoSplit(
        hospitals=tuple(sites),
        validation=Site("validation", x[val_idx], y[val_idx]),
        test=Site("test", x[test_idx], y[test_idx]),
        seed=seed,
    )


def _stratified_folds(rng: np.random.Generator, idx: np.ndarray, y: np.ndarray, k: int) -> list[np.ndarray]:
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in (0.0, 1.0):
        members = idx[y[idx] == cls]
        members = members[rng.permutation(len(members))]
        for j, m in enumerate(members.tolist()):
            folds[j % k].append(m)
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]
