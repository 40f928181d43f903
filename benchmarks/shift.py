"""How well the shift score tells another lab's images from the training lab's.

    python benchmarks/shift.py [--train ../shared/data/pbc/pbc_64.npz] \\
        [--external ../shared/data/deepapl/images] [--n 3000]

The description of the training images (:class:`core.shift.ShiftReference`) is fitted on
80 % of the training set (seeded); the other 20 % (same lab, never fitted on) and a seeded
sample of the external images (read as the predictor reads them, at the training size) are
scored. Prints the ROC AUC of the score for "external vs held-out in-domain", the share of
each beyond 0.99, and the per-batch flag.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(ROOT.parent / "shared/data/pbc/pbc_64.npz"))
    ap.add_argument("--external", default=str(ROOT.parent / "shared/data/deepapl/images"))
    ap.add_argument("--n", type=int, default=3000, help="external images sampled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from core.images import Preprocessing, find_images
    from core.shift import ShiftReference

    X = np.load(args.train)["images"]
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(X))
    cut = int(0.8 * len(X))
    t = time.perf_counter()
    ref = ShiftReference.fit(X[idx[:cut]], seed=args.seed)
    fit_s = time.perf_counter() - t
    paths = find_images(args.external)
    pick = [
        paths[i] for i in np.sort(rng.choice(len(paths), min(args.n, len(paths)), replace=False))
    ]
    E = Preprocessing(X.shape[1]).load(pick)[0]
    t = time.perf_counter()
    s_in, s_out = ref.score(X[idx[cut:]]), ref.score(E)
    score_s = time.perf_counter() - t
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    print(
        f"fitted on {cut} training images in {fit_s:.1f} s; scored {len(s_in)} held-out "
        f"in-domain and {len(s_out)} external images in {score_s:.1f} s"
    )
    print(f"ROC AUC (external vs held-out in-domain): {roc_auc_score(y, np.r_[s_in, s_out]):.3f}")
    for name, s in (("in-domain held out", s_in), ("external", s_out)):
        b = ShiftReference.batch_summary(s)
        print(
            f"{name}: median score {b['median_score']:.3f}, beyond 0.99: "
            f"{b['share_out']:.1%}, batch flagged: {b['flagged']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
