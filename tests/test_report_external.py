"""The report's External validation section: external sets scored at the end of `run`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from bench.report import write_report
from bench.report.tables import EXTERNAL_COLUMNS, external_agreement
from tests.conftest import COLOUR_FOREST, TOY_CLASSES, toy_arrays, write_tiny_config

EVIL = "<script>alert(1)</script>"
EXTRA = (
    COLOUR_FOREST
    + """
[ensembles.vote_all]
type = "soft_voting"
members = "all"

[report]
gradcam = false

[datasets.toy]
path = "{data}"

[external.ext]
path = "{ext}"
datasets = ["toy"]
"""
)


def _external_folder(root: Path) -> Path:
    """Another lab: paler, pinker toy images, plus one class the run does not have."""
    X, y = toy_arrays(6, 32, seed=11)
    x = np.clip(0.75 * X.astype(float) + 0.25 * np.array([255, 210, 230]), 0, 255)
    for i, (im, c) in enumerate(zip(x.astype(np.uint8), y)):
        d = root / TOY_CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    (root / "other").mkdir()
    Image.fromarray(x[0].astype(np.uint8)).save(root / "other" / "x.png")
    return root


@pytest.fixture(scope="module")
def ext_run(tmp_path_factory, toy_folder):
    """A finished run (two random forests and their soft vote) scored on one external
    set; its report written at the end of ``run``."""
    from bench.run.runner import run_from_args

    root = tmp_path_factory.mktemp("report_ext")
    ext = _external_folder(root / "lab2")
    cfg = write_tiny_config(
        root / "c.toml", toy_folder, extra=EXTRA.format(data=toy_folder, ext=ext)
    )
    _, out = run_from_args(
        str(cfg),
        data="toy",
        out=str(root / "run"),
        only=["rf_hog", "rf_colour"],
        show_progress=False,
    )
    return out


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("report", "predictor"))
    return dest


def _section(html: str) -> str:
    i = html.index('<section id="external">')
    return html[i : html.index("</section>", i)]


def _rewrite_scores(d: Path, values: dict[str, float]) -> pd.DataFrame:
    """Set the external balanced accuracy (and its interval around it) of some entries."""
    f = d / "external" / "ext" / "scores.csv"
    s = pd.read_csv(f)
    for name, v in values.items():
        row = s["candidate"] == name
        s.loc[row, "balanced_accuracy"] = v
        s.loc[row, "balanced_accuracy_lo"] = max(0.0, v - 0.1)
        s.loc[row, "balanced_accuracy_hi"] = min(1.0, v + 0.1)
    s.to_csv(f, index=False)
    return s


def test_report_has_the_external_section(ext_run):
    rep = ext_run / "report"
    html = (rep / "index.html").read_text()
    sec = _section(html)
    assert '<a href="#external">External validation</a>' in html
    assert "<h2>External validation</h2>" in sec and "<h3>ext</h3>" in sec
    meta = json.loads((ext_run / "external" / "ext" / "meta.json").read_text())
    assert meta["n"] == 18
    assert "<dt>images</dt><dd>18" in sec
    assert "other: 1" in sec  # the class the run does not have
    assert "sample of" not in sec  # the whole set was scored
    assert "patients / groups" not in sec  # no groups: images are the unit
    assert "over images" in sec
    assert "Spearman" in sec
    # the figures and CSVs the section links to
    for rel in (
        "img/external_ext_scatter.png",
        "img/external_ext_recall.png",
        "csv/external_ext.csv",
        "csv/external_ext_recall.csv",
    ):
        assert f'"{rel}"' in sec and (rep / rel).is_file(), rel
    # every image and CSV the page links to is there
    for rel in re.findall(r'(?:src|href)="((?:img|csv)/[^"]+)"', html):
        assert (rep / rel).is_file(), rel


def test_table_matches_the_leaderboard_and_scores(ext_run):
    rep = ext_run / "report" / "csv"
    board = pd.read_csv(rep / "leaderboard.csv")
    table = pd.read_csv(rep / "external_ext.csv")
    scores = pd.read_csv(ext_run / "external" / "ext" / "scores.csv").set_index("candidate")
    assert list(table.columns) == list(EXTERNAL_COLUMNS)
    assert list(table["candidate"]) == list(board["candidate"])  # leaderboard order
    assert set(table["candidate"]) == {"rf_hog", "rf_colour", "vote_all"}
    assert list(table["leaderboard_rank"]) == list(board["rank"])
    t = table.set_index("candidate")
    b = board.set_index("candidate")
    for m in ("balanced_accuracy", "accuracy"):
        for suffix in ("", "_lo", "_hi"):
            assert t[f"external_{m}{suffix}"].to_numpy() == pytest.approx(
                scores.loc[t.index, f"{m}{suffix}"].to_numpy()
            )
        assert t[f"in_domain_{m}"].to_numpy() == pytest.approx(b.loc[t.index, m].to_numpy())
    assert t["external_macro_f1"].to_numpy() == pytest.approx(
        scores.loc[t.index, "macro_f1"].to_numpy()
    )
    assert t["gap_balanced_accuracy"].to_numpy() == pytest.approx(
        (t["external_balanced_accuracy"] - t["in_domain_balanced_accuracy"]).to_numpy()
    )
    for side in ("in_domain", "external"):
        expect = t[f"{side}_balanced_accuracy"].rank(ascending=False, method="min")
        assert t[f"{side}_rank"].tolist() == expect.astype(int).tolist()
    # the run's own leaderboard.csv has the set's columns with the same numbers
    run_board = pd.read_csv(ext_run / "leaderboard.csv").set_index("candidate")
    assert run_board.loc[t.index, "ext_balanced_accuracy"].to_numpy() == pytest.approx(
        t["external_balanced_accuracy"].to_numpy()
    )
    html = (ext_run / "report" / "index.html").read_text()
    sec = _section(html)
    for name, r in t.iterrows():
        assert f'data-sort="{r["external_balanced_accuracy"]!r}"' in sec, name


def test_spearman_and_winner_match_scipy(ext_run):
    table = pd.read_csv(ext_run / "report" / "csv" / "external_ext.csv")
    a = table["in_domain_balanced_accuracy"].to_numpy()
    b = table["external_balanced_accuracy"].to_numpy()
    agree = external_agreement(table)
    sec = _section((ext_run / "report" / "index.html").read_text())
    if np.ptp(a) > 0 and np.ptp(b) > 0:
        r = spearmanr(a, b)
        assert agree["rho"] == pytest.approx(r.statistic)
        assert agree["p"] == pytest.approx(r.pvalue)
        assert f"Spearman ρ = {r.statistic:.3f}" in sec
    else:
        assert np.isnan(agree["rho"]) and "Spearman ρ: undefined" in sec
    assert agree["n"] == 3 and agree["best_in_domain"] == table["candidate"].iloc[0]
    assert b[list(table["candidate"]).index(agree["best_external"])] == b.max()
    assert agree["winner_holds"] == bool(b[0] >= b.max())


def test_winner_that_does_not_hold_is_said_and_warned(ext_run, tmp_path):
    d = _copy(ext_run, tmp_path / "flip")
    board = pd.read_csv(ext_run / "report" / "csv" / "leaderboard.csv")
    names = list(board["candidate"])
    first, last = names[0], names[-1]
    _rewrite_scores(d, {first: 0.31, last: 0.93, names[1]: 0.62})
    html = write_report(d, gradcam=False, progress=False).read_text()
    sec = _section(html)
    assert "The leaderboard's winner is not the winner on ext</b>" in sec
    assert "not the leaderboard's winner</span>" in sec
    table = pd.read_csv(d / "report" / "csv" / "external_ext.csv")
    assert list(table["external_balanced_accuracy"]) == pytest.approx([0.31, 0.62, 0.93])
    assert list(table["external_rank"]) == [3, 2, 1]
    r = spearmanr(table["in_domain_balanced_accuracy"], table["external_balanced_accuracy"])
    assert f"Spearman ρ = {r.statistic:.3f}" in sec
    assert external_agreement(table)["rho"] == pytest.approx(r.statistic)
    assert external_agreement(table)["best_external"] == last
    # the winner falls below 0.5 outside the lab: the warnings box says so
    warn = html[html.index('<section id="warnings">') : html.index('<section id="leaderboard">')]
    assert "Results do not hold outside the training lab (ext)" in warn
    assert f"&#39;{first}&#39; reaches a balanced accuracy of 0.310" in warn


def _perfect_in_domain(d: Path) -> list[str]:
    """Make every entry's out-of-fold probabilities one-hot on the true class (in-domain
    balanced accuracy exactly 1, whatever the toy models scored); the entries' names."""
    from bench.run.rundir import RunDir

    rd = RunDir(d)
    names = [str(n) for n in rd.read_leaderboard()["candidate"]]
    for name in names:
        np.save(rd.oof_file(name), np.eye(len(rd.classes))[rd.labels])
    return names


@pytest.mark.parametrize("drop, warned", [(0.05, False), (0.25, True)])
def test_warning_on_a_large_drop(ext_run, tmp_path, drop, warned):
    """External balanced accuracy ``drop`` below a perfect in-domain one and above the 0.5
    floor: the drop alone decides the warning."""
    d = _copy(ext_run, tmp_path / f"drop{drop}")
    _rewrite_scores(d, {n: 1.0 - drop for n in _perfect_in_domain(d)})
    html = write_report(d, gradcam=False, progress=False).read_text()
    assert ("Results do not hold outside the training lab" in html) == warned
    assert (f"against 1.000 in-domain (gap {-drop:+.3f}" in html) == warned
    assert "is not the winner on ext" not in html  # all tied: the winner holds


def test_no_section_without_external_sets(ext_run, tmp_path):
    d = _copy(ext_run, tmp_path / "plain")
    shutil.rmtree(d / "external")
    html = write_report(d, gradcam=False, progress=False).read_text()
    assert 'id="external"' not in html and "External validation" not in html
    assert "Results do not hold outside" not in html
    assert not list((d / "report" / "img").glob("external_*"))
    assert not list((d / "report" / "csv").glob("external_*"))


def test_html_characters_in_names_are_escaped(ext_run, tmp_path):
    d = _copy(ext_run, tmp_path / "evil")
    rename = {"disc": EVIL, "square": 'a "b" & <i>c</i> $x$'}
    state = json.loads((d / "state.json").read_text())
    state["classes"] = [rename.get(c, c) for c in state["classes"]]
    (d / "state.json").write_text(json.dumps(state))
    folds = pd.read_csv(d / "folds.csv")
    folds["label"] = folds["label"].map(lambda c: rename.get(c, c))
    folds.to_csv(d / "folds.csv", index=False)
    m = json.loads((d / "manifest.json").read_text())
    m["dataset"]["counts"] = {rename.get(c, c): n for c, n in m["dataset"]["counts"].items()}
    (d / "manifest.json").write_text(json.dumps(m))
    ext = d / "external" / "ext"
    pc = pd.read_csv(ext / "per_class.csv")
    pc["class"] = pc["class"].map(lambda c: rename.get(c, c))
    pc.to_csv(ext / "per_class.csv", index=False)
    meta = json.loads((ext / "meta.json").read_text())
    meta["unmapped"] = {"<b>x</b>": 2, EVIL: 1}  # the other lab's folder names
    meta["entry"]["path"] = "/data/<img src=x onerror=alert(2)>"
    (ext / "meta.json").write_text(json.dumps(meta))
    html = write_report(d, gradcam=False, progress=False).read_text()
    sec = _section(html)
    assert EVIL not in html and "<i>c</i>" not in html and "<b>x</b>" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: 1" in sec
    assert "&lt;b&gt;x&lt;/b&gt;: 2" in sec
    assert html.count("<script>") == 1  # the report's own sorting script only
    recall = pd.read_csv(d / "report" / "csv" / "external_ext_recall.csv")
    assert EVIL in set(recall["class"])
    assert (d / "report" / "img" / "external_ext_recall.png").is_file()


def test_agreement_edge_cases():
    def table(ind, ext):
        n = len(ind)
        return pd.DataFrame(
            {
                "candidate": [f"e{i}" for i in range(n)],
                "in_domain_balanced_accuracy": ind,
                "external_balanced_accuracy": ext,
            }
        )

    a = external_agreement(table([0.9], [0.4]))
    assert np.isnan(a["rho"]) and "at least two" in a["why"] and a["winner_holds"]
    a = external_agreement(table([0.9, 0.8, 0.7], [0.6, 0.6, 0.5]))  # tied for first
    assert a["winner_holds"] and a["best_external"] == "e0"
    assert a["rho"] == pytest.approx(spearmanr([0.9, 0.8, 0.7], [0.6, 0.6, 0.5]).statistic)
    a = external_agreement(table([0.9, 0.8, 0.7], [0.5, 0.5, 0.5]))
    assert np.isnan(a["rho"]) and "same external" in a["why"]
    a = external_agreement(table([0.9, 0.8, 0.7], [np.nan, 0.7, 0.6]))
    assert a["best_external"] == "e1" and a["winner_holds"] is False and a["n"] == 2
