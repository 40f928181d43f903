"""One home per list of names: metrics, aggregators and TTA views are read from their
registries by the config schema, the CLI and the tables; the shared helpers (bootstrap,
path containment) behave as their callers need."""

from __future__ import annotations

import os
from typing import get_args

import numpy as np
import pandas as pd
import pytest

from bench.commands.cli import build_parser
from bench.config import PatientsSection, PredictorSection, RunSection
from bench.run.leaderboard import to_markdown
from bench.stats.scoring import bootstrap_weights
from bench.stats.inference import bootstrap_resamples
from core.io import is_inside
from core.metrics import (
    LABEL_METRICS,
    LOWER_IS_BETTER,
    METRICS,
    RANKING_METRICS,
    REGISTRY,
    base_metric,
    fold_metrics,
    metric_label,
)
from ensembles.bags import AGGREGATORS, CELL_AGGREGATORS, DEFAULT_AGGREGATORS, make_aggregator
from ensembles.tta import TTA_VIEWS, VIEWS


def _literal(model, field):
    args = get_args(model.model_fields[field].annotation)
    return args if all(isinstance(a, str) for a in args) else get_args(args[0])


def test_the_config_schema_reads_the_registries():
    assert _literal(RunSection, "metric") == RANKING_METRICS
    assert RANKING_METRICS[: len(METRICS)] == METRICS and all(
        base_metric(m) in LABEL_METRICS for m in RANKING_METRICS[len(METRICS) :]
    )
    assert _literal(PredictorSection, "tta") == tuple(TTA_VIEWS)
    assert _literal(PatientsSection, "aggregators") == tuple(AGGREGATORS)


def test_the_cli_reads_the_tta_registry():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    tta = next(a for a in sub.choices["evaluate"]._actions if a.dest == "tta")
    assert list(tta.choices) == list(TTA_VIEWS)
    assert all(v in VIEWS for views in TTA_VIEWS.values() for v in views)


def test_metric_registry_names_labels_directions():
    assert set(METRICS) < set(REGISTRY) and "ece" in REGISTRY
    assert LOWER_IS_BETTER == {"log_loss", "ece"}
    assert LABEL_METRICS == ("accuracy", "balanced_accuracy", "macro_f1")
    assert REGISTRY["log_loss"].direction == "minimize"
    assert REGISTRY["accuracy"].direction == "maximize"
    assert metric_label("roc_auc") == "ROC AUC (OvR)" and metric_label("other") == "other"
    board = {"candidate": ["a"], "kind": ["x"], "fit_seconds": [1.0], "predict_ms_per_image": [1.0]}
    board |= {c: [0.5] for m in METRICS for c in (m, f"{m}_std")}
    head = to_markdown(pd.DataFrame(board), "accuracy").splitlines()[4]
    assert all(REGISTRY[m].label in head for m in METRICS)


def test_each_metric_weighs_a_row_as_its_repeats():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    p = rng.dirichlet(np.ones(4), 60)
    w = rng.integers(0, 4, 60)
    for name, m in REGISTRY.items():
        assert m.fn(y, p, sample_weight=w) == pytest.approx(
            m.fn(np.repeat(y, w), np.repeat(p, w, axis=0)), abs=1e-12
        ), name
        assert m.fn(y, p, sample_weight=np.ones(60)) == pytest.approx(m.fn(y, p)), name
    assert fold_metrics(y, p) == {m: REGISTRY[m].fn(y, p) for m in METRICS}


def test_macro_f1_of_core_metrics_averages_over_all_classes():
    y = np.array([0, 0, 1, 1])
    p = np.eye(3)[[0, 0, 1, 1]]  # class 2 neither present nor predicted
    assert REGISTRY["macro_f1"].fn(y, p) == pytest.approx(2 / 3)


def test_aggregator_settings_come_from_the_patients_section():
    """Each aggregator's default lives in ``[patients]`` (PatientsSection), once; the
    classes take their settings from it and give them back by ``params()``."""
    from bench.config import PatientsSection

    settings = PatientsSection().model_dump()
    assert settings["aggregators"] == list(DEFAULT_AGGREGATORS)
    # all but the one that pools a backbone's embeddings (it needs a frozen candidate)
    assert set(AGGREGATORS) - set(DEFAULT_AGGREGATORS) == {"attention"}
    for name, cls in AGGREGATORS.items():
        agg = make_aggregator(name, settings)
        assert type(agg) is cls
        again = make_aggregator(name, {**settings, **agg.params()})
        assert again.params() == agg.params()
    assert make_aggregator("trimmed_mean", settings).trim == settings["trim"] == 0.1
    assert make_aggregator("trimmed_mean", {"trim": 0.25}).trim == 0.25
    assert make_aggregator("top_k_mean", {"top_fraction": 0.5}).fraction == 0.5
    assert CELL_AGGREGATORS == ("mean", "trimmed_mean", "top_k_mean")
    with pytest.raises(KeyError):  # no second default in the class
        make_aggregator("trimmed_mean", {})
    with pytest.raises(ValueError, match="unknown aggregator"):
        make_aggregator("median", {})


def test_one_bootstrap_for_images_groups_and_strata():
    groups = np.array(["b", "a", "b", "c", "a", "a"])
    _, codes = np.unique(groups, return_inverse=True)
    for w, idx in zip(bootstrap_weights(6, groups, 20, 3), bootstrap_resamples(3, 20, 3)):
        assert np.array_equal(w, np.bincount(idx, minlength=3)[codes])
    for w, idx in zip(bootstrap_weights(6, None, 20, 3), bootstrap_resamples(6, 20, 3)):
        assert np.array_equal(w, np.bincount(idx, minlength=6))
    strata = np.array([1, 0, 1, 1, 0, 1, 1])
    rows = list(bootstrap_resamples(7, 50, 0, strata=strata))
    assert len(rows) == 50
    for r in rows:  # class 0's units first, then class 1's: sizes kept in every resample
        assert np.array_equal(strata[r], np.sort(strata))


def test_is_inside_resolves_links(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "out", root / "link")
    assert is_inside(root, root) and is_inside(root / "a" / "x.png", root)
    assert not is_inside(root / "link" / "x.png", root)
    assert not is_inside(root / "a" / ".." / ".." / "out", root)
    assert not is_inside(tmp_path / "rootsibling", root)
