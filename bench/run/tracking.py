"""Run tracking: a finished run logged as one MLflow run (``[run] tracking = "mlflow"``).

Logged, after the report: params (profile, data, folds, seed, metric, the saved entry, the
commit, every candidate's type and parameters), metrics (every numeric leaderboard column
of every row as ``<entry>/<column>``, and each candidate's per-fold metrics as
``<candidate>/fold/<metric>`` with the fold as the step), tags (the run directory, the
versions), and artifacts (``leaderboard.csv``/``.md``, ``config.toml``, ``manifest.json``,
the report, the model card). The MLflow run's id goes into the run's manifest
(``tracking``). A store that cannot be written is a warning: the run itself is kept.

The default store is SQLite in ``./mlruns`` (``mlruns/mlflow.db``, artifacts in
``mlruns/artifacts``): MLflow 3 keeps its plain-file store (``file:./mlruns``) in
maintenance and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; both work here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.config import Config
from bench.run.context import RunContext, Stage
from bench.run.rundir import RunDir
from core.progress import info, warn

MAX_PARAM = 500  # characters of one parameter's value kept


def tracking_uri(cfg: Config) -> str:
    return cfg.run.tracking_uri or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<its folder>/artifacts``); other stores
    keep their own default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = str(value)[:MAX_PARAM]


def params_of(cfg: Config, run: RunDir, predictor: str | None) -> dict[str, str]:
    m = run.read_manifest()
    out = {
        "profile": cfg.profile or "",
        "data": Path(cfg.data.path).name if cfg.data.path else "",
        "dataset": cfg.data.name or "",
        "n_images": str((m.get("dataset") or {}).get("n_images", "")),
        "folds": str(cfg.run.folds),
        "seed": str(cfg.run.seed),
        "metric": cfg.run.metric,
        "predictor": predictor or "",
        "git_commit": str(m.get("git_commit") or ""),
    }
    for name, entry in cfg.candidates.items():
        out[f"{name}.type"] = entry.type
        _flat(name, entry.params, out)
    return out


def metrics_of(run: RunDir, cfg: Config, board) -> list[tuple[str, float, int]]:
    """``(key, value, step)``: every finite numeric leaderboard cell, and each candidate's
    per-fold metrics."""
    out = []
    numeric = [c for c in board.columns if c not in ("candidate", "kind", "role", "members")]
    for _, r in board.iterrows():
        for c in numeric:
            try:
                v = float(r[c])
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out.append((f"{r['candidate']}/{c}", v, 0))
    for name in cfg.candidates:
        for k in run.folds.fold_ids:
            for metric, v in (run.unit_result(name, k).get("metrics") or {}).items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out.append((f"{name}/fold/{metric}", float(v), int(k)))
    return out


def log_run(run: RunDir, cfg: Config, board, predictor: str | None, uri: str | None = None) -> str:
    """Log the finished run in ``run`` to the MLflow store ``uri`` (default
    :func:`tracking_uri`); returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    name = cfg.run.tracking_experiment
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, _artifact_root(uri))
    tags = {
        "bloodbench.run_dir": str(run.path.resolve()),
        "bloodbench.predictor": predictor or "",
    }
    mlrun = client.create_run(exp_id, run_name=run.path.name, tags=tags)
    rid = mlrun.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in params_of(cfg, run, predictor).items()]
    metrics = [Metric(k, v, now, s) for k, v, s in metrics_of(run, cfg, board)]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i : i + 1000])
    client.log_batch(rid, tags=[RunTag("bloodbench.n_metrics", str(len(metrics)))])
    for f in (run.LEADERBOARD_CSV, run.LEADERBOARD_MD, run.CONFIG, "manifest.json"):
        if run.file(f).is_file():
            client.log_artifact(rid, str(run.file(f)))
    if run.predictor_manifest.is_file() and run.model_card.is_file():
        client.log_artifact(rid, str(run.model_card), "predictor")
    if run.report_dir.is_dir():
        client.log_artifacts(rid, str(run.report_dir), "report")
    client.set_terminated(rid)
    return rid


def _tracking_stage(ctx: RunContext) -> None:
    uri = tracking_uri(ctx.cfg)
    predictor = ctx.run.read_state().get("predictor")
    try:
        rid = log_run(ctx.run, ctx.cfg, ctx.board, predictor, uri)
    except Exception as exc:  # noqa: BLE001 - a tracking store's fault keeps the run
        warn(f"[run] tracking: could not log the run to {uri}: {type(exc).__name__}: {exc}")
        return
    ctx.run.update_manifest(tracking={"uri": uri, "run_id": rid})
    info(f"tracked: MLflow run {rid} in {uri} (experiment {ctx.cfg.run.tracking_experiment})")


#: after the report, in the main run only (not a protocol's sub-run)
STAGE = Stage(
    "tracking",
    _tracking_stage,
    lambda ctx: ctx.predictor and ctx.cfg.run.tracking == "mlflow",
    timed=False,
)
