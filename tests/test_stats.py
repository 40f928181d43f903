"""Statistics, calibration and report metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    roc_auc_score,
)

from core.calibration import (
    TemperatureScaler,
    apply_temperature,
    cross_fit_temperature,
    ece,
    fit_temperature,
    reliability,
)
from bench.report.tables import metrics_of
from bench.stats.inference import (
    corrected_resampled_ttest,
    fold_size_ratio,
    friedman,
    holm,
    mcnemar,
    nemenyi_cd,
    nemenyi_q,
    t_interval,
)

A = [0.80, 0.82, 0.78, 0.85, 0.75]
B = [0.78, 0.80, 0.79, 0.80, 0.74]


def test_t_interval_matches_hand_computation():
    r = t_interval(A, 0.95)
    std = math.sqrt(0.0058 / 4)  # squared deviations from 0.80 sum to 0.0058
    half = 2.7764451051977987 * std / math.sqrt(5)  # t(0.975, 4 df) from a table
    assert r["mean"] == pytest.approx(0.80)
    assert r["std"] == pytest.approx(std)
    assert (r["lo"], r["hi"]) == pytest.approx((0.80 - half, 0.80 + half))
    one = t_interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["lo"]) and math.isnan(one["std"])
    assert t_interval([0.7, np.nan, 0.9])["n"] == 2


def test_corrected_resampled_ttest_matches_hand_computation():
    ratio = fold_size_ratio([160] * 5, [640] * 5)
    assert ratio == 0.25
    r = corrected_resampled_ttest(A, B, ratio)
    # d = [.02, .02, -.01, .05, .01]: mean .018, sample variance 4.7e-4
    t = 0.018 / math.sqrt((1 / 5 + 0.25) * 4.7e-4)
    assert r["mean_diff"] == pytest.approx(0.018)
    assert r["t"] == pytest.approx(t)
    assert t == pytest.approx(1.23770, abs=1e-4)
    assert r["df"] == 4
    assert r["p"] == pytest.approx(2 * st.t.sf(t, 4))
    # without the correction term it is the ordinary paired t-test
    plain = corrected_resampled_ttest(A, B, 0.0)
    ref = st.ttest_rel(A, B)
    assert plain["t"] == pytest.approx(ref.statistic)
    assert plain["p"] == pytest.approx(ref.pvalue)
    assert r["p"] > plain["p"]  # the correction is conservative
    same = corrected_resampled_ttest(A, A, ratio)
    assert same["p"] == 1.0 and same["t"] == 0.0
    shifted = corrected_resampled_ttest(np.array(A) + 0.01, A, ratio)
    assert shifted["p"] == 0.0
    with pytest.raises(ValueError):
        corrected_resampled_ttest(A, B[:3], ratio)
    with pytest.raises(ValueError):
        fold_size_ratio([10, 10], [0, 40])


def test_mcnemar_exact_and_chi_square():
    # b = 1, c = 6: exact two-sided binomial p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8/128
    ca = np.array([1] * 1 + [0] * 6 + [1] * 20 + [0] * 5, bool)
    cb = np.array([0] * 1 + [1] * 6 + [1] * 20 + [0] * 5, bool)
    r = mcnemar(ca, cb)
    assert (r["b"], r["c"], r["method"]) == (1, 6, "exact")
    assert r["p"] == pytest.approx(0.125)
    # b = 30, c = 10: chi2 = (|30 - 10| - 1)^2 / 40 = 9.025
    ca = np.array([1] * 30 + [0] * 10 + [1] * 50, bool)
    cb = np.array([0] * 30 + [1] * 10 + [1] * 50, bool)
    r = mcnemar(ca, cb)
    assert (r["b"], r["c"], r["method"]) == (30, 10, "chi2")
    assert r["statistic"] == pytest.approx(9.025)
    assert r["p"] == pytest.approx(st.chi2.sf(9.025, 1))
    assert r["p"] == pytest.approx(0.002663, abs=2e-6)
    assert mcnemar(cb, cb)["p"] == 1.0


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([np.nan, 0.02, 0.5])
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.04, 0.5])


def test_friedman_and_nemenyi_match_hand_computation():
    # method 0 always best; methods 1 and 2 swap: average ranks 1, 2.5, 2.5
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.7, 0.8], [0.95, 0.85, 0.75], [0.9, 0.6, 0.8]])
    r = friedman(scores)
    assert r["avg_ranks"] == pytest.approx([1.0, 2.5, 2.5])
    assert r["chi2"] == pytest.approx(6.0)  # 12*4/(3*4) * (1 + 6.25 + 6.25 - 12)
    assert r["p"] == pytest.approx(math.exp(-3.0))  # chi-square, 2 df
    assert r["F"] == pytest.approx(9.0)  # 3 * 6 / (4 * 2 - 6)
    assert r["p_F"] == pytest.approx(st.f.sf(9.0, 2, 6))
    low = friedman(1 - scores, higher_is_better=False)  # errors instead of accuracies
    assert low["avg_ranks"] == pytest.approx(r["avg_ranks"])
    assert nemenyi_cd(3, 4) == pytest.approx(2.343 * math.sqrt(0.5))
    # beyond the table: the studentized range agrees with the table's last value
    assert nemenyi_q(10) == pytest.approx(3.164)
    assert nemenyi_q(11) == pytest.approx(3.219, abs=2e-3)
    with pytest.raises(ValueError):
        friedman(scores[:1])


def test_report_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4), 25)
    logits = rng.normal(size=(100, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = metrics_of(y, p)
    pred = p.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["ece"] == pytest.approx(ece(y, p))
    assert 0.3 < m["accuracy"] < 1.0


def _two_class(conf, correct):
    """Two-class probabilities with top-class confidence ``conf``; label right iff ``correct``."""
    conf = np.asarray(conf, float)
    p = np.stack([conf, 1 - conf], axis=1)
    y = np.where(correct, 0, 1)
    return y, p


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    # two bins, each exactly as accurate as it is confident
    conf = np.r_[np.full(100, 0.6), np.full(100, 0.9)]
    correct = np.r_[np.arange(100) < 60, np.arange(100) < 90]
    y, p = _two_class(conf, correct)
    assert ece(y, p) == pytest.approx(0.0, abs=1e-12)
    # over-confident: 99% sure, right half of the time
    y, p = _two_class(np.full(200, 0.99), np.arange(200) < 100)
    assert ece(y, p) == pytest.approx(0.49)
    # sampled from a calibrated model: small
    rng = np.random.default_rng(1)
    c = rng.uniform(0.5, 1.0, 20000)
    y, p = _two_class(c, rng.random(20000) < c)
    assert ece(y, p) < 0.02
    t = reliability(y, p, 10)
    assert t["count"].sum() == 20000 and len(t) == 10


def test_temperature_scaling_fixes_overconfidence_and_keeps_predictions():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3)) + 1.0 * np.eye(3)[y]
    sharp = np.exp(4 * logits) / np.exp(4 * logits).sum(axis=1, keepdims=True)  # 4x too sharp
    t = fit_temperature(y, sharp)
    assert t == pytest.approx(4.0, rel=0.15)
    fixed = apply_temperature(sharp, t)
    assert (fixed.argmax(axis=1) == sharp.argmax(axis=1)).all()
    assert ece(y, fixed) < ece(y, sharp) / 3
    assert log_loss(y, fixed) < log_loss(y, sharp)
    assert apply_temperature(sharp, 1.0) == pytest.approx(sharp)
    assert TemperatureScaler().fit(sharp, y).temperature_ == pytest.approx(t)
    folds = np.arange(3000) % 3
    scaled, temps = cross_fit_temperature(y, sharp, folds)
    assert len(temps) == 3 and ece(y, scaled) < ece(y, sharp) / 3
    with pytest.raises(ValueError):
        apply_temperature(sharp, 0.0)


def test_the_verdict_reads_the_interval_and_the_review_share():
    from bench.config import StatsSection
    from bench.stats.scoring import verdict

    st = StatsSection(usable_balanced_accuracy=0.8, usable_review_share=0.5)
    v = verdict(0.06, 0.0, 0.13, 351, st, in_lab=0.97, review_share=1.0)
    assert v["verdict"] == "not usable"
    assert v["line"].startswith(
        "not usable on this set: balanced accuracy 0.06 [0.00, 0.13] on 351 images against "
        "0.97 in its own lab; 100% would go to review"
    )
    assert verdict(0.9, 0.85, 0.93, 400, st, review_share=0.2)["verdict"] == "usable"
    # a good score with too much sent to review is not usable as it stands
    assert verdict(0.9, 0.85, 0.93, 400, st, review_share=0.6)["verdict"] == "not usable"
    assert verdict(0.82, 0.74, 0.89, 60, st)["verdict"] == "not shown"
    assert "usable_review_share" not in verdict(0.82, 0.74, 0.89, 60, st)["line"]
    # the bar comes from the config
    assert (
        verdict(0.82, 0.74, 0.89, 60, StatsSection(usable_balanced_accuracy=0.7))["verdict"]
        == "usable"
    )


def test_temperature_applies_over_the_classes_of_each_fold():
    """Fold probabilities (F, N, K): each fold's rows scaled as (N, K) rows are, so a
    predictor with a stored temperature gives cross-conformal sets the right outputs."""
    from core.calibration import apply_temperature

    rng = np.random.default_rng(0)
    folds = rng.dirichlet(np.ones(4), size=(3, 5))
    scaled = apply_temperature(folds, 2.0)
    assert scaled.shape == (3, 5, 4) and np.allclose(scaled.sum(-1), 1.0)
    for f in range(3):
        assert np.allclose(scaled[f], apply_temperature(folds[f], 2.0))
