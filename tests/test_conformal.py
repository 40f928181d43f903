"""Conformal prediction sets (core.conformal): coverage on exchangeable data, the state
round trip, risk-coverage and AURC, one-line refusals."""

import numpy as np
import pytest

from core.conformal import (
    ConformalSets,
    accuracy_at_coverage,
    aurc,
    cross_conformal,
    nonconformity,
    refer_band,
    review_flags,
    review_threshold,
    risk_coverage,
    set_figures,
)
from core.errors import BenchError

#: 2000 calibration and 2000 test rows: one seed's coverage has a standard deviation of
#: about 1 point at 90 % (calibration draw and test rows together; measured 0.8-1.0 over 80
#: seeds). Each seed may fall at most 3 standard deviations below nominal, the mean of the
#: 8 seeds at most 3 standard deviations of that mean (a wrong quantile, e.g. n instead of
#: n + 1 or a strict inequality for a pooled score, moves the mean by more).
TOLERANCE = 0.03
MEAN_TOLERANCE = 0.01


def synthetic(n: int, k: int, rng):
    """Exchangeable rows: probabilities from a Dirichlet, the label drawn from a
    sharpened and mixed version of them (the model is miscalibrated on purpose)."""
    logits = rng.normal(0, 2.0, size=(n, k)) + np.eye(k)[rng.integers(0, k, n)] * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    true = 0.7 * p**2 / (p**2).sum(axis=1, keepdims=True) + 0.3 / k
    y = np.array([rng.choice(k, p=row) for row in true])
    return p, y


@pytest.mark.parametrize("method", ["mondrian", "lac", "aps", "raps"])
def test_coverage_at_least_nominal_across_seeds(method):
    for confidence in (0.90, 0.95):
        covs = []
        for seed in range(8):
            rng = np.random.default_rng(seed)
            p, y = synthetic(4000, 5, rng)
            cs = ConformalSets.fit(p[:2000], y[:2000], method, confidence)
            fig = set_figures(cs.sets(p[2000:]), y[2000:])
            assert fig["coverage"] >= confidence - TOLERANCE, (method, confidence, seed, fig)
            covs.append(fig["coverage"])
        assert np.mean(covs) >= confidence - MEAN_TOLERANCE, (method, confidence, covs)


def test_mondrian_covers_each_class_and_a_rare_one():
    covs = {c: [] for c in range(4)}
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        p, y = synthetic(8000, 4, rng)
        rare = np.flatnonzero(y == 3)[200:]  # class 3 made rare
        keep = rng.permutation(np.setdiff1d(np.arange(len(y)), rare))
        p, y = p[keep], y[keep]
        half = len(y) // 2
        sets = ConformalSets.fit(p[:half], y[:half], "mondrian", 0.9).sets(p[half:])
        for c in range(4):
            m = y[half:] == c
            covs[c].append(sets[m, c].mean())
    for c, v in covs.items():
        assert np.mean(v) >= 0.9 - 0.03, (c, v)


def test_sets_grow_with_confidence_and_state_round_trips():
    rng = np.random.default_rng(3)
    p, y = synthetic(1500, 6, rng)
    cs = ConformalSets.fit(p[:1000], y[:1000], "aps", 0.9)
    lo, hi = cs.sets(p[1000:], 0.8), cs.sets(p[1000:], 0.99)
    assert (lo <= hi).all() and hi.sum() > lo.sum()
    again = ConformalSets.from_dict(cs.to_dict(), 6)
    assert (again.sets(p[1000:]) == cs.sets(p[1000:])).all()


def test_cross_conformal_never_calibrates_on_the_scored_fold(monkeypatch):
    """Spy: each fold's rows are scored by a calibration that holds none of them."""
    import core.conformal as cc

    rng = np.random.default_rng(0)
    p, y = synthetic(600, 3, rng)
    fold = np.arange(600) % 4
    seen = []
    real = cc.ConformalSets.fit.__func__

    def spy(cls, proba, labels, *a, **kw):
        seen.append({tuple(np.round(r, 12)) for r in proba})
        return real(cls, proba, labels, *a, **kw)

    monkeypatch.setattr(cc.ConformalSets, "fit", classmethod(spy))
    out = cross_conformal(p, y, fold, "mondrian")
    assert len(seen) == 4
    for k in range(4):
        scored = {tuple(np.round(r, 12)) for r in p[fold == k]}
        assert not (scored & seen[k])
    assert out["0.9"]["coverage"] >= 0.86 and out["0.95"]["mean_set_size"] >= 1


def test_confidence_and_method_refused_in_one_line():
    p = np.full((4, 2), 0.5)
    for bad in (0, 1, 1.5, -0.1, float("nan"), "0.9", True):
        with pytest.raises(BenchError) as e:
            ConformalSets.fit(p, [0, 1, 0, 1], "mondrian", bad)
        assert "\n" not in str(e.value) and "between 0 and 1" in str(e.value)
    with pytest.raises(BenchError, match="one of"):
        ConformalSets.fit(p, [0, 1, 0, 1], "bayes", 0.9)
    with pytest.raises(BenchError):
        ConformalSets.from_dict(
            {"method": "lac", "confidence": 0.9, "scores": [0.1], "labels": [7]}, 2
        )


def test_aps_and_raps_scores():
    p = np.array([[0.6, 0.3, 0.1]])
    assert np.allclose(nonconformity(p, "aps"), [[0.6, 0.9, 1.0]])
    assert np.allclose(nonconformity(p, "raps", raps_lambda=0.1, raps_k=1), [[0.6, 1.0, 1.2]])
    assert np.allclose(nonconformity(p, "mondrian"), [[0.4, 0.7, 0.9]])


def test_risk_coverage_aurc_and_thresholds():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True])
    cov, risk = risk_coverage(conf, correct)
    assert np.allclose(cov, [0.25, 0.5, 0.75, 1.0])
    assert np.allclose(risk, [0, 0, 1 / 3, 1 / 4])
    a = aurc(conf, correct)
    assert a["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)
    assert a["excess_aurc"] == pytest.approx(a["aurc"] - 1 / 16)
    assert aurc(conf, np.array([True, True, True, False]))["excess_aurc"] == pytest.approx(0)
    assert accuracy_at_coverage(conf, correct, 0.5) == 1.0
    assert accuracy_at_coverage(conf, correct, 0.75) == pytest.approx(2 / 3)
    assert review_threshold(conf, correct, 0.0) == 0.8
    assert review_threshold(conf, correct, 0.3) == 0.6
    assert review_threshold(conf, ~correct, 0.0) > 1


def test_review_flags_and_refer_band():
    sets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    proba = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    f = review_flags(sets, proba, shift=np.array([0.2, 0.3, 1.0, 0.1]), conf_threshold=0.6)
    assert f["review"].tolist() == [False, True, True, True]
    assert f["shifted"].tolist() == [False, False, True, False]
    band = refer_band([0.1, 0.4, 0.6, 0.9], [False, True, False, True], 0.5)
    assert (band["lo"], band["hi"], band["n_wrong"]) == (0.4, 0.6, 2)


def test_cross_p_values_count_each_fold_models_own_rows():
    """Vovk's cross-conformal p-value: sum over folds of the fold's rows at least as strange
    as the fold model's score of the new image, plus one, over n + 1 (per class with
    Mondrian); brute force on small numbers, and equal to the split p-value when every
    fold model says the same."""
    from core.conformal import cross_p_values, p_values

    rng = np.random.default_rng(3)
    cal = np.round(rng.random(40), 6)
    lab = rng.integers(0, 3, 40)
    fold = np.arange(40) % 4
    new = np.round(rng.random((4, 5, 3)), 6)  # 4 fold models, 5 images, 3 classes
    for mondrian in (False, True):
        got = cross_p_values(cal, lab, fold, new, mondrian)
        want = np.zeros((5, 3))
        for i in range(5):
            for c in range(3):
                rows = [(k, j) for j in range(40) for k in [fold[j]] if not mondrian or lab[j] == c]
                want[i, c] = (sum(cal[j] >= new[k, i, c] for k, j in rows) + 1) / (len(rows) + 1)
        assert np.allclose(got, want), mondrian
        same = np.repeat(new[:1], 4, axis=0)
        assert np.allclose(
            cross_p_values(cal, lab, fold, same, mondrian), p_values(cal, lab, new[0], mondrian)
        )


def test_cross_conformal_sets_of_a_bag_cover_and_round_trip():
    """A bag of correlated fold models (shared signal, a little noise per fold model), each
    calibration row scored by its own fold model: the cross-conformal sets of the bag keep
    the nominal coverage on new rows, the state round-trips through its JSON form, and
    the wrong number of fold models is one line."""
    k, n, folds = 4, 4000, 5
    cover = []
    for seed in range(3):
        rng = np.random.default_rng(seed)

        def fold_models(m):
            y = rng.integers(0, k, m)
            base = np.eye(k)[y] * 1.5 + rng.normal(0, 1.0, (m, k))
            logits = base[None] + rng.normal(0, 0.3, (folds, m, k))
            return np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True), y

        pc, yc = fold_models(n)
        f = np.arange(n) % folds
        cs = ConformalSets.fit(pc[f, np.arange(n)], yc, "lac", 0.9, folds=f)
        pn, yn = fold_models(n)
        sets = cs.sets(pn.mean(axis=0), fold_proba=pn)
        cover.append(sets[np.arange(n), yn].mean())
        again = ConformalSets.from_dict(cs.to_dict(), k)
        assert again.n_folds == folds and (again.sets(None, fold_proba=pn) == sets).all()
    assert abs(np.mean(cover) - 0.9) < 0.015, cover
    with pytest.raises(BenchError, match="need the probabilities of 5 fold models"):
        cs.sets(pn.mean(axis=0), fold_proba=pn[:2])
    bad = {**cs.to_dict(), "folds": [0] * (n - 1)}
    with pytest.raises(BenchError, match="'folds' must give each calibration row"):
        ConformalSets.from_dict(bad, k)


def test_predictor_calibration_rows_follow_the_rows_setting():
    """``rows = "combiner"`` calibrates on the saved combiner over the members' out-of-fold
    probabilities (what the predictor computes), ``"oof"`` on the entry's own rows."""
    from bench.stats.conformal_sets import predictor_extra
    from bench.config import ConformalSection
    from core.splits import PredefinedFolds

    class NoExternal:
        def external_sets(self):
            return []

    rng = np.random.default_rng(1)
    p, y = synthetic(400, 3, rng)
    other = np.roll(p, 1, axis=1)  # a different set of probabilities
    folds = PredefinedFolds(np.arange(400) % 4)
    got = {}
    for rows in ("combiner", "oof"):
        s = ConformalSection(rows=rows, confidence=0.9)
        e = predictor_extra(NoExternal(), s, y, p, folds, "stack", {}, combined=other)
        got[rows] = e["conformal"]
    want = {"combiner": other, "oof": p}
    for rows, entry in got.items():
        true = nonconformity(want[rows], "mondrian")[np.arange(400), y]
        assert np.allclose(entry["scores"], np.round(true, 6)), rows
    assert "saved combiner" in got["combiner"]["fitted_on"]
    assert got["oof"]["fitted_on"].startswith("out-of-fold probabilities of 'stack'")
