"""Confidence intervals and plots: checked against independent references."""

import numpy as np
import pytest

from recompress.metrics import auc, weighted_auc
from recompress.stats import median_ratio, paired_auc_delta


def test_weighted_auc_equals_auc_of_the_replicated_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.random(400), 2)  # ties
    w = rng.integers(0, 4, (5, 400))
    got = weighted_auc(y, s, w)
    for k in range(5):
        assert got[k] == pytest.approx(auc(np.repeat(y, w[k]), np.repeat(s, w[k])), abs=1e-12)


def test_paired_delta_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 1000), rng.random(1000)
    d = paired_auc_delta(y, p, p)
    assert d["delta"] == d["lo"] == d["hi"] == 0.0 and not d["significant"]


def test_paired_delta_separates_signal_from_noise():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 2000)
    good = y + rng.normal(0, 1.0, 2000)
    same_but_noisy = good + rng.normal(0, 0.05, 2000)
    much_worse = y + rng.normal(0, 3.0, 2000)
    assert not paired_auc_delta(y, same_but_noisy, good)["significant"]
    d = paired_auc_delta(y, much_worse, good)
    assert d["significant"] and d["hi"] < 0 and d["lo"] <= d["delta"] <= d["hi"]


def test_paired_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    truth_y = rng.integers(0, 2, 200_000)
    a, b = truth_y + rng.normal(0, 1.0, 200_000), truth_y + rng.normal(0, 1.2, 200_000)
    true_delta = auc(truth_y, a) - auc(truth_y, b)
    hits = 0
    for t in range(40):
        idx = rng.integers(0, 200_000, 800)
        d = paired_auc_delta(truth_y[idx], a[idx], b[idx], resamples=400, seed=t)
        hits += d["lo"] <= true_delta <= d["hi"]
    assert 32 <= hits <= 40  # 95% nominal; binomial(40, 0.95) is below 32 with probability < 0.1%


def test_median_ratio_and_its_interval():
    rng = np.random.default_rng(4)
    base = rng.lognormal(0, 0.1, 500)
    r = median_ratio(2 * base, base)
    assert r["ratio"] == pytest.approx(2.0) and r["lo"] == pytest.approx(2.0) and r["hi"] == pytest.approx(2.0)
    noisy = median_ratio(rng.lognormal(np.log(2), 0.5, 300), rng.lognormal(0, 0.5, 300))
    assert noisy["lo"] < 2.0 < noisy["hi"] and noisy["hi"] / noisy["lo"] > 1.1


def test_frontier_ignores_ties_below_the_resolution():
    from recompress.evaluate.plots import frontier
    pts = [(10, 0.700), (20, 0.700001), (30, 0.72), (5, 0.60), (40, 0.71)]
    assert frontier(pts) == [3, 0, 2]  # (20, +1e-6) is a tie with (10), not a frontier point


def test_pareto_plot_labels_never_overlap_points_or_each_other(tmp_path):
    from recompress.evaluate import plots
    rng = np.random.default_rng(5)
    cost = list(np.exp(rng.uniform(10, 12, 14)))  # crowded on purpose
    acc = list(0.7 + rng.normal(0, 0.003, 14))
    labels = [f"variant number {i}" for i in range(14)]
    boxes = []
    real = plots._place_labels
    plots_place = lambda *a: boxes.extend(real(*a))
    try:
        plots._place_labels = plots_place
        plots.pareto_plot(labels, cost, acc, tmp_path / "p.png", xlabel="bytes", bytes_axis=True)
    finally:
        plots._place_labels = real
    assert (tmp_path / "p.png").stat().st_size > 10_000 and len(boxes) == 14
    clashes = sum(plots._overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert clashes == 0


def test_bytes_axis_is_in_binary_units():
    from recompress.evaluate.plots import _bytes_label
    assert _bytes_label(2 ** 20) == "1 MiB" and _bytes_label(3 * 2 ** 30) == "3 GiB" and _bytes_label(512) == "512 B"
