"""The batch-level warning (core/batch.py): batches like the training labs' pass, a batch the
predictor answers unlike them (low confidence, one class for every cell) is flagged."""

from __future__ import annotations

import numpy as np

from core.batch import LIMIT, batch_check, batch_reference, batch_stats


def _oof(n=1000, k=5, seed=0, sharp=6.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += sharp
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_batches_like_the_training_ones_pass_and_a_lost_batch_is_flagged():
    p, y = _oof()
    ref = batch_reference(p, y, seed=0, draws=500)
    assert set(ref["by_size"]) == {"20", "50", "100", "200", "500"}
    assert np.isclose(sum(ref["prevalence"]), 1)
    fresh, _ = _oof(seed=1)
    rng = np.random.default_rng(2)
    scores = [
        batch_check(fresh[rng.choice(1000, 50, replace=False)], ref)["score"] for _ in range(200)
    ]
    assert np.mean(np.asarray(scores) > LIMIT) < 0.05  # in-lab batches rarely flagged
    # a lab where the models hesitate and call nearly every cell one class
    lost = np.full((50, 5), 0.15)
    lost[:, 3] = 0.4
    lost[0] = [0.4, 0.15, 0.15, 0.15, 0.15]
    c = batch_check(lost, ref)
    assert c["flagged"] and c["score"] > LIMIT
    assert "49 of 50 cells called one class" in c["line"] and "bench adapt" in c["line"]
    assert "needs adapting" in c["line"]
    assert "was adapted to a lab" in batch_check(lost, ref, adapted=True)["line"]
    conf, mix = batch_stats(lost, np.asarray(ref["prevalence"]))
    assert np.isclose(conf, 0.4) and mix > 0.7
    # too few cells to judge; a reference without a size that small
    assert batch_check(lost[:10], ref) is None
    assert batch_check(lost, batch_reference(p[:30], y[:30])) is not None  # size 20 only
    assert batch_check(lost[:20], {"prevalence": ref["prevalence"], "by_size": {}}) is None
