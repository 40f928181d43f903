"""Is a batch of cells like the ones the predictor was checked on? A warning without labels.

A predictor lost in a new lab does not know it: its review flags and colour shift score may
stay quiet while most answers are wrong (issue 42: 8.5 % flagged, 94 % wrong, on a lab with
tight crops). Two things of a *batch* betray it, both read from what the models answer:

* **confidence**: the batch's mean maximum probability falls below what batches of the same
  size from the training labs' held-out folds show;
* **class mix**: the batch's predicted classes are spread unlike the training labs' (350 of
  351 cells called one class is not a smear): the total-variation distance between the
  batch's predicted-class shares and the training prevalence.

:func:`batch_reference` draws seeded batches of several sizes from the out-of-fold
probabilities of the saved entry (rows no model of that fold saw) and keeps each statistic's
mean and spread per size; :func:`batch_check` turns a new batch into a score (the larger of
the two statistics in reference standard deviations) and a flag beyond ``limit``. The score's
power to tell a new lab from the training labs is measured by ``benchmarks/batch_shift.py``.
"""

from __future__ import annotations

import numpy as np

SIZES = (20, 50, 100, 200, 500)
DRAWS = 2000
LIMIT = 3.0  # reference standard deviations; beyond it the batch is flagged
MIN_BATCH = 20  # fewer cells say too little about a batch


def batch_stats(proba: np.ndarray, prevalence: np.ndarray) -> tuple[float, float]:
    """``(mean maximum probability, total-variation distance of the predicted-class shares
    from ``prevalence``)`` of one batch."""
    proba = np.asarray(proba, dtype=np.float64)
    k = proba.shape[1]
    shares = np.bincount(proba.argmax(axis=1), minlength=k) / max(len(proba), 1)
    return float(proba.max(axis=1).mean()), float(0.5 * np.abs(shares - prevalence).sum())


def batch_reference(proba, y, seed: int = 0, sizes=SIZES, draws: int = DRAWS) -> dict:
    """The reference of :func:`batch_check` from out-of-fold probabilities ``proba`` and
    labels ``y`` (the training prevalence): per batch size, the mean and standard deviation
    of both statistics over ``draws`` seeded batches."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = proba.shape[1]
    prevalence = np.bincount(y, minlength=k) / max(len(y), 1)
    rng = np.random.default_rng(seed)
    by_size = {}
    for n in sizes:
        if n > len(proba):
            break
        stats = np.array(
            [
                batch_stats(proba[rng.choice(len(proba), n, replace=False)], prevalence)
                for _ in range(draws)
            ]
        )
        by_size[str(n)] = {
            "confidence_mean": float(stats[:, 0].mean()),
            "confidence_sd": float(max(stats[:, 0].std(), 1e-6)),
            "mix_mean": float(stats[:, 1].mean()),
            "mix_sd": float(max(stats[:, 1].std(), 1e-6)),
        }
    return {"prevalence": prevalence.tolist(), "by_size": by_size, "limit": LIMIT}


def batch_check(proba, reference: dict, adapted: bool = False) -> dict | None:
    """The batch's statistics against ``reference``: ``score`` (reference standard
    deviations: confidence below its mean, or class mix beyond it, whichever is larger),
    ``flagged`` (score beyond the limit) and a ``line`` to print (``adapted``: the
    predictor was adapted to a lab, whose batches the training labs' reference does not
    describe); ``None`` for a batch too small to judge or a reference without a size at or
    below it."""
    proba = np.asarray(proba)
    n = len(proba)
    sizes = sorted(int(s) for s in reference.get("by_size", {}))
    fit = [s for s in sizes if s <= n]
    if n < MIN_BATCH or not fit:
        return None
    # the largest reference size up to n: a larger batch's statistics spread less, so this
    # is conservative (fewer flags than the exact size would give)
    ref = reference["by_size"][str(fit[-1])]
    conf, mix = batch_stats(proba, np.asarray(reference["prevalence"]))
    z_conf = (ref["confidence_mean"] - conf) / ref["confidence_sd"]
    z_mix = (mix - ref["mix_mean"]) / ref["mix_sd"]
    score = float(max(z_conf, z_mix))
    limit = float(reference.get("limit", LIMIT))
    flagged = score > limit
    why = []
    if z_conf > limit:
        why.append(
            f"mean confidence {conf:.2f} against {ref['confidence_mean']:.2f} in the training labs"
        )
    if z_mix > limit:
        top = int(np.bincount(proba.argmax(axis=1)).max())
        why.append(f"a class mix unlike the training labs' ({top} of {n} cells called one class)")
    return {
        "n": int(n),
        "confidence": conf,
        "class_mix_distance": mix,
        "score": score,
        "flagged": bool(flagged),
        "line": (
            f"this batch of {n} cells does not look like the training labs' ("
            + "; ".join(why)
            + f"; {score:.1f} reference SDs): "
            + (
                "this predictor was adapted to a lab (bench adapt); trust it here only if "
                "this is that lab and its verdict there was usable"
                if adapted
                else "the predictor needs adapting to this lab before use (bench adapt, "
                "then bench calibrate on labelled cells)"
            )
            if flagged
            else ""
        ),
    }


__all__ = ["batch_reference", "batch_check", "batch_stats", "SIZES", "LIMIT", "MIN_BATCH"]
