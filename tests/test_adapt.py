"""``bench adapt``: a predictor adapted to a new lab's unlabelled images (AdaBN of its CNN
members, the shift reference refitted) and written as a new verified predictor; the
original byte-identical, unchanged files linked, the cells adapted on recorded and left out
of every figure reported for the new predictor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.stats.draws import adaptation_rows
from bench.commands.cli import main
from core.errors import BenchError
from ensembles.predictor import load_predictor, verify_predictor
from tests.conftest import TOY_CLASSES, toy_arrays, write_tiny_config

EXTRA = """
[ensembles.stack]
type = "stacking"
members = "all"

[predictor]
ensemble = "stack"
adapt_features = "hog"

[profiles.tiny.candidates.cnn_tiny.params]
epochs = 6
"""


def _digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory, toy_folder):
    root = tmp_path_factory.mktemp("adapt_run")
    cfg = write_tiny_config(root / "cfg.toml", toy_folder, EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOODBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bloodbench-cache"))
        assert main(["run", "--config", str(cfg), "--out", str(root / "run")]) == 0
    return root / "run" / "predictor"


def _new_lab(root: Path, n_per_class=12, labelled=True) -> Path:
    """Toy cells under another 'stain': channels scaled and offset."""
    images, labels = toy_arrays(n_per_class, 32, seed=5)
    shifted = np.clip(images * np.array([0.7, 1.1, 0.8]) + [40, -10, 30], 0, 255).astype(np.uint8)
    for i, (im, c) in enumerate(zip(shifted, labels)):
        d = root / TOY_CLASSES[c] if labelled else root
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{TOY_CLASSES[c]}_{i:04d}.png")
    return root


def test_adaptation_rows_keep_half_out_and_whole_groups():
    used, scored = adaptation_rows(10, None, 2000, 0)
    assert (
        len(used) == 5 and set(used) | set(scored) == set(range(10)) and not set(used) & set(scored)
    )
    assert len(adaptation_rows(100, None, 7, 0)[0]) == 7
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    used, scored = adaptation_rows(12, groups, 2000, 1)
    g = np.asarray(groups)
    assert not set(g[used]) & set(g[scored]) and 0 < len(used) <= 6
    with pytest.raises(BenchError, match="at least 2"):
        adaptation_rows(1, None, 10, 0)


def test_adapt_writes_a_new_verified_predictor_and_leaves_the_original(model, tmp_path, capsys):
    before = _digest(model)
    lab = _new_lab(tmp_path / "lab")
    out = tmp_path / "adapted"
    assert main(["adapt", "--model", str(model), "--data", str(lab), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert _digest(model) == before  # byte-identical
    rec = verify_predictor(out)
    ad = rec.raw["adaptation"]
    assert ad["n_images"] == 18 and len(ad["rows"]) == 18 and ad["scored_rows"] == 18
    assert ad["members_adapted"] == ["cnn_tiny"] and ad["layers"] > 0 and not ad["labels_used"]
    assert (
        ad["from_manifest_sha256"]
        == json.loads((model / "manifest.json").read_text())["manifest_sha256"]
    )
    # the CNN's fold models were saved anew with other batch-norm statistics; the forest's
    # files are hard links to the original's
    old, new = load_predictor(model), load_predictor(out)
    bn = [
        (a, b)
        for ca, cb in zip(old.members_["cnn_tiny"], new.members_["cnn_tiny"])
        for a, b in zip(ca.model_.layers, cb.model_.layers)
        if hasattr(a, "moving_mean")
    ]
    assert bn and all(not np.allclose(a.moving_mean, b.moving_mean) for a, b in bn)
    rf = [r for r in rec.raw["files"] if r.startswith("members/rf_hog/")]
    assert rf and all((out / r).stat().st_ino == (model / r).stat().st_ino for r in rf)
    assert rec.raw["shift"] != json.loads((model / "manifest.json").read_text())["shift"]
    # labelled set: scored before and after on the images kept out, with a verdict
    assert ad["before"]["n"] == ad["after"]["n"] == 18
    assert sum(ad["after"]["class_mix"].values()) == 18 and 0 <= ad["after"]["share_flagged"] <= 1
    (line,) = [ln for ln in said.splitlines() if ln.startswith("verdict: ")]
    assert "on 18 labelled images not used to adapt" in line
    assert ad["verdict"]["line"] in line
    card = (out / "MODEL_CARD.md").read_text()
    assert "Adapted to a new lab" in card and "No labels were used" in card
    # evaluate of the adapted predictor on the same set leaves the adapted cells out
    ev = tmp_path / "ev"
    argv = ["evaluate", "--model", str(out), "--data", str(lab), "--out", str(ev)]
    assert main(argv + ["--no-gradcam"]) == 0
    res = json.loads((ev / "evaluation.json").read_text())
    assert res["n"] == 18 and res["data"]["adaptation_rows_left_out"] == 18
    assert res["balanced_accuracy"] == pytest.approx(ad["after"]["balanced_accuracy"])
    assert "not used to adapt" in res["verdict"]["line"]


def test_adapt_on_unlabelled_images_and_refusals(model, tmp_path, capsys):
    lab = _new_lab(tmp_path / "flat", n_per_class=4, labelled=False)
    out = tmp_path / "a"
    assert main(["adapt", "--model", str(model), "--data", str(lab), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "verdict: none without labels" in said
    assert verify_predictor(out).raw["adaptation"]["n_images"] == 6
    for args, why in (
        (["--out", str(out)], "exists; give a new folder"),
        (["--out", str(model / "x")], "inside the predictor"),
        (["--out", str(tmp_path / "b"), "--max-images", "0"], "--max-images must be at least 1"),
    ):
        assert main(["adapt", "--model", str(model), "--data", str(lab), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err


def test_recalibration_learns_a_lab_shift_and_keeps_the_original_when_nothing_changed():
    from core import recalibrate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), y] += 2.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # the same cells, as a lab where the model leans to class 0 (a stain that looks like it)
    leaning = recalibrate.apply(p, 1.0, [2.0, 0.0, 0.0])
    fit = recalibrate.fit(leaning[:150], y[:150])
    fixed = recalibrate.apply(leaning[150:], fit["temperature"], fit["bias"])

    def nll(q, t):
        return -np.log(q[np.arange(len(t)), t]).mean()

    assert nll(fixed, y[150:]) < nll(leaning[150:], y[150:]) - 0.2
    assert fit["bias"][0] < fit["bias"][1] and fit["bias"][0] < fit["bias"][2]
    # nothing to learn: the inner CV keeps (nearly) the original answers
    same = recalibrate.fit(p[:150], y[:150])
    kept = recalibrate.apply(p[150:], same["temperature"], same["bias"])
    assert np.mean(kept.argmax(1) == p[150:].argmax(1)) > 0.95


def test_adapt_with_labelled_cells_recalibrates_the_output(model, tmp_path, capsys):
    lab = _new_lab(tmp_path / "lab")
    out = tmp_path / "adapted_n"
    argv = ["adapt", "--model", str(model), "--data", str(lab), "--out", str(out), "--n", "9"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "lab head on 9 labelled cells" in said
    rec = verify_predictor(out).raw
    la, ad = rec["label_adaptation"], rec["adaptation"]
    assert la["n"] == 9 and set(la["rows"]) <= set(ad["rows"]) and ad["labels_used"]
    assert la["temperature"] > 0 and len(la["bias"]) == 3
    assert load_predictor(out).label_adaptation_["bias"] == la["bias"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "9 of those images were used with their labels" in card
    assert "unlabelled" not in card.split("### Adapted to a new lab")[1].split("###")[0]
    # without labels, --n is refused before any model is loaded
    flat = _new_lab(tmp_path / "flat", n_per_class=4, labelled=False)
    bad = ["adapt", "--model", str(model), "--data", str(flat), "--out", str(tmp_path / "x")]
    assert main(bad + ["--n", "5"]) == 2
    assert "has no labels" in capsys.readouterr().err


def test_adapt_with_labels_fits_a_lab_head_the_new_predictor_applies(model, tmp_path, capsys):
    """--n with enough cells: the lab head's arrays are a checksummed file of the new
    predictor, which applies them to every image; the prediction sets are calibrated anew
    on the head's cross-fitted outputs; adapting the adapted predictor replaces its head."""
    from core.labhead import LabHead
    from features import extract_central

    lab = _new_lab(tmp_path / "lab", n_per_class=20)
    out = tmp_path / "adapted_head"
    argv = ["adapt", "--model", str(model), "--data", str(lab), "--out", str(out), "--n", "24"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "lab head on 24 labelled cells" in said
    rec = verify_predictor(out).raw
    la = rec["label_adaptation"]
    assert la["head"] == "adaptation/lab_head.npz" and la["head"] in rec["files"]
    assert la["chosen"] in {labhead_name for labhead_name in la["inner_log_loss"]}
    assert la["feature_set"] in ("", "all") and la["n_features"] > 0 and la["crop"] in (0.5, 1)
    assert "lab-head outputs of 24 labelled cells" in rec["conformal"]["fitted_on"]
    judged = rec["adaptation"]["adabn_judged"]  # the labelled cells judge AdaBN
    assert set(judged) >= {"kept", "inner_log_loss_adapted", "inner_log_loss_unadapted"}
    assert judged["kept"] == (
        judged["inner_log_loss_adapted"] <= judged["inner_log_loss_unadapted"]
    )
    cnn_file = next((out / "members" / "cnn_tiny").rglob("*.keras"))
    original = model / cnn_file.relative_to(out)
    assert cnn_file.samefile(original) == (not judged["kept"])  # kept: saved anew
    assert rec["adaptation"]["layers"] == (judged["layers"] if judged["kept"] else 0)
    assert rec["adaptation"]["sets_recalibrated"]
    assert "calibrated anew on the labelled cells" in (out / "MODEL_CARD.md").read_text()
    assert main(["inspect", str(out)]) == 0
    assert f"lab head on 24 labelled cells: {la['chosen']}" in capsys.readouterr().out
    head = LabHead.load(out / la["head"])
    # the new predictor's output is the head applied to its members' combined output
    pred = load_predictor(out)
    images = sorted(lab.rglob("*.png"))[:6]
    X = pred.preprocessing.load(images)[0]
    got = pred.predict_proba(X, preprocessed=True)
    pred.lab_head_ = pred.label_adaptation_ = None
    base = pred.predict_proba(X, preprocessed=True)
    feats = extract_central(X, head.feature_set, head.crop) if head.uses_features else None
    assert np.allclose(got, head.apply(base, feats), atol=1e-6)
    # adapting it again replaces the head: fitted anew on the members' output
    again = tmp_path / "again"
    argv2 = ["adapt", "--model", str(out), "--data", str(lab), "--out", str(again)]
    assert main(argv2 + ["--n", "20", "--seed", "3"]) == 0
    rec2 = verify_predictor(again).raw
    assert rec2["label_adaptation"]["n"] == 20 and rec2["label_adaptation"]["seed"] == 3
    assert (again / "adaptation" / "lab_head.npz").read_bytes() != (out / la["head"]).read_bytes()
    assert not (again / "adaptation" / "lab_head.npz").samefile(out / la["head"])
    # without --n the adapted predictor's head stays (linked, not copied)
    plain = tmp_path / "plain"
    assert main(["adapt", "--model", str(out), "--data", str(lab), "--out", str(plain)]) == 0
    assert "label_adaptation" in verify_predictor(plain).raw
