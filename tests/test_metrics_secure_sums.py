"""Evaluation metrics as secure sums (fedveil.metrics): exact cohort means, never one site's figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.metrics import EvaluationLayout, EvaluationLayoutError, weighted_metrics

site = st.tuples(
    st.integers(0, 5000),  # examples
    st.fixed_dictionaries({}, optional={
        "loss": st.floats(0, 50, allow_nan=False),
        "accuracy": st.floats(0, 1, allow_nan=False),
        "auc": st.floats(0, 1, allow_nan=False),
    }),
)


def ring_sum(layout: EvaluationLayout, sections: list[np.ndarray]) -> np.ndarray:
    dtype = np.uint32 if layout.ring_bits <= 32 else np.uint64
    total = np.zeros(layout.dimension, dtype=np.uint64)
    for s in sections:
        total = (total + s.astype(np.uint64)) % np.uint64(1 << layout.ring_bits) if layout.ring_bits < 64 \
            else total + s.astype(np.uint64)
    return total.astype(dtype)


@given(st.lists(site, min_size=1, max_size=40), st.sampled_from([32, 48, 64]))
@settings(max_examples=80, deadline=None)
def test_the_decoded_sum_is_the_example_weighted_mean_of_the_sites_that_report_each_metric(
    sites: list[tuple[int, dict[str, float]]], ring_bits: int
) -> None:
    layout = EvaluationLayout.plan(("loss", "accuracy", "auc"), len(sites), ring_bits)
    dtype = np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)
    sections = [layout.encode(m, e, dtype) for e, m in sites]
    means, total = layout.decode(ring_sum(layout, sections), len(sites))
    for name in layout.metrics:
        rows = [(e, m[name]) for e, m in sites if name in m and e > 0]
        if not rows:
            assert name not in means
            continue
        expected = sum(e * v for e, v in rows) / sum(e for e, _ in rows)
        # each site's e * value is rounded to the layout's 2^-frac_bits (41 bits with the default clip and
        # cap): a site with one example is off by up to 2^-42 on its own, so the bound scales with the sites
        resolution = len(rows) * 2.0 ** -(layout.frac_bits + 1) / sum(e for e, _ in rows)
        assert means[name] == pytest.approx(expected, abs=resolution + 1e-9)
    assert total == pytest.approx(max((sum(e for e, m in sites if n in m and e > 0) for n in layout.metrics),
                                      default=0))


def test_a_site_with_one_example_is_decoded_to_the_layouts_resolution() -> None:
    # the case hypothesis found against a fixed 1e-6 tolerance when values kept only 13 fractional bits
    # (a 52-bit width): with 80 bits the default clip and cap leave 41, so one example is exact to 2^-42
    layout = EvaluationLayout.plan(("loss", "accuracy", "auc"), 1, 32)
    assert layout.frac_bits == 41
    value = 0.5773412843185021
    section = layout.encode({"loss": value}, 1, np.dtype(np.uint32))
    means, total = layout.decode(ring_sum(layout, [section]), 1)
    assert means == {"loss": round(value * 2**41) / 2**41} and total == 1.0
    assert abs(means["loss"] - value) <= 2.0**-42


def test_one_sites_section_is_all_the_server_could_decode_and_it_never_decodes_alone() -> None:
    # The server only ever decodes the ring sum of >= t masked inputs; this checks that the layout
    # needs the contributor count (a single section decoded as if it were a sum of 3 is garbage).
    layout = EvaluationLayout.plan(("accuracy",), 3, 32)
    one = layout.encode({"accuracy": 0.75}, 100, np.dtype(np.uint32))
    means, _ = layout.decode(one, 3)
    assert means.get("accuracy") != pytest.approx(0.75)  # garbage, or left out as impossible


def test_values_are_clipped_and_examples_capped() -> None:
    layout = EvaluationLayout.plan(("loss",), 2, 64, value_clip=10.0, max_examples=1000)
    dtype = np.dtype(np.uint64)
    sections = [layout.encode({"loss": 1e9}, 10**9, dtype), layout.encode({"loss": -1e9}, 10, dtype)]
    means, total = layout.decode(ring_sum(layout, sections), 2)
    assert total == 1010
    assert means["loss"] == pytest.approx((1000 * 10 - 10 * 10) / 1010)


def test_non_finite_metrics_and_zero_examples_contribute_nothing() -> None:
    layout = EvaluationLayout.plan(("loss", "auc"), 2, 32)
    dtype = np.dtype(np.uint32)
    sections = [layout.encode({"loss": 1.0, "auc": math.nan}, 50, dtype), layout.encode({"loss": 5.0}, 0, dtype)]
    means, _ = layout.decode(ring_sum(layout, sections), 2)
    assert means == {"loss": pytest.approx(1.0)}


@pytest.mark.parametrize("bad", [dict(metrics=()), dict(metrics=("a", "a")), dict(value_clip=math.inf),
                                 dict(limb_bits=40), dict(frac_bits=60)])
def test_an_unusable_layout_is_refused_naming_the_field(bad: dict[str, object]) -> None:
    fields: dict[str, object] = dict(metrics=("loss",), value_clip=100.0, frac_bits=20, limb_bits=20, limbs=3,
                                     max_examples=1000, ring_bits=32)
    fields.update(bad)
    with pytest.raises(EvaluationLayoutError):
        EvaluationLayout(**fields)  # type: ignore[arg-type]


def test_weighted_metrics_skip_nan_and_weigh_by_examples() -> None:
    rows = [("a", 10, {"loss": 1.0, "auc": math.nan}), ("b", 30, {"loss": 3.0, "auc": 0.5})]
    assert weighted_metrics(rows) == {"auc": 0.5, "loss": 2.5}


@given(st.lists(site, min_size=1, max_size=12), st.sampled_from([32, 64]), st.integers(0, 2),
       st.sampled_from(["examples", "weighted"]), st.integers(1, 40))
@settings(max_examples=80, deadline=None)
def test_a_metric_no_honest_cohort_could_sum_to_is_left_out(sites: list[tuple[int, dict[str, float]]],
                                                            ring_bits: int, metric: int, word: str,
                                                            shift: int) -> None:
    """The third attacker review: one site added 2^20 to the top of its evaluation section and the
    stored cohort accuracy became 42,949,673. A site may add anything to its own section: a sum
    outside what the honest sites could produce loses that metric, and the others are kept."""
    layout = EvaluationLayout.plan(("loss", "accuracy", "auc"), len(sites) + 1, ring_bits)
    dtype = np.dtype(np.uint32 if ring_bits <= 32 else np.uint64)
    honest = [layout.encode(m, e, dtype) for e, m in sites]
    evil = layout.encode({"loss": 1.0, "accuracy": 1.0, "auc": 1.0}, 100, dtype).astype(np.uint64)
    # the top limb of the chosen word: a carry into bits no honest sum reaches
    index = (2 * metric + (0 if word == "examples" else 1)) * layout.limbs + layout.limbs - 1
    evil[index] = (int(evil[index]) + (1 << min(shift, layout.limb_bits - 1))) % (1 << layout.ring_bits)
    n = len(sites) + 1
    means, total = layout.decode(ring_sum(layout, [*honest, evil.astype(dtype)]), n)
    honest_means, _ = layout.decode(ring_sum(layout, [*honest, layout.encode({}, 0, dtype)]), n)
    # whatever is kept is something honest sites could report: a mean within the clip, examples within the cap
    assert all(abs(v) <= layout.value_clip * (1 + 1e-6) for v in means.values()), means
    assert 0 <= total <= n * layout.max_examples + n
    for other in layout.metrics:
        if other != layout.metrics[metric] and other in honest_means:
            assert other in means  # the others are kept


def test_the_reviewers_shifted_accuracy_is_left_out_and_the_loss_kept() -> None:
    layout = EvaluationLayout.plan(("loss", "accuracy"), 4, 32)
    dtype = np.dtype(np.uint32)
    sections = [layout.encode({"loss": 0.5, "accuracy": 0.8}, 100, dtype) for _ in range(4)]
    top = (2 * 1 + 1) * layout.limbs + layout.limbs - 1  # accuracy's weighted sum, top limb
    sections[0][top] = (int(sections[0][top]) + (1 << 20)) % (1 << 32)
    means, total = layout.decode(ring_sum(layout, sections), 4)
    assert "accuracy" not in means and means["loss"] == pytest.approx(0.5) and total == 400
