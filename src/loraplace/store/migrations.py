"""The store's schema, as the steps that bring a store from each version to the next. The current version is the
last step's: add a version here and the store migrates to it, nothing else to change."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from typing import Any

from loraplace.records import (
    AccuracyDetail,
    Adapter,
    CurvePoint,
    Environment,
    EvalPoint,
    Failure,
    GroupKey,
    Metrics,
    ProbeScores,
    ProbeSite,
    Site,
    SiteMap,
    Size,
    StudyInfo,
    Timings,
    TrialLabels,
    TrialOutcome,
)

Migration = str | Callable[[sqlite3.Connection], None]


def _v3_typed_records(db: sqlite3.Connection) -> None:
    """v2 → v3: result dicts become :class:`TrialOutcome` JSON, labels become :class:`TrialLabels`, each study gets
    a :class:`StudyInfo`, and the metrics table keeps measured quantities only."""
    db.execute("ALTER TABLE studies ADD COLUMN info_json TEXT")
    db.execute("ALTER TABLE trials RENAME COLUMN result_json TO outcome_json")
    for study_id, spec_json in db.execute("SELECT id, spec_json FROM studies").fetchall():
        spec = json.loads(spec_json)
        rows = db.execute("SELECT id, config_json, status, error, failed_step, outcome_json FROM trials "
                          "WHERE study_id = ? ORDER BY position", (study_id,)).fetchall()
        order: list[str] = []
        for trial_id, config_json, status, error, failed_step, result_json in rows:
            config = json.loads(config_json)
            labels = _labels_v2(config["labels"])
            if labels.group.placement not in order:
                order.append(labels.group.placement)
            config["labels"] = labels.model_dump(mode="json")
            metrics = dict(db.execute("SELECT name, value FROM metrics WHERE trial_id = ?", (trial_id,)).fetchall())
            outcome = _outcome_v2(status, error, failed_step, json.loads(result_json) if result_json else None,
                                  metrics)
            db.execute("UPDATE trials SET config_json = ?, outcome_json = ? WHERE id = ?",
                       (json.dumps(config), None if outcome is None else outcome.model_dump_json(), trial_id))
        # v2 stored the spec with sorted keys, so the spec's own placement order is lost; the grid's (trial
        # positions follow the spec) is not. Placements with no trial keep the sorted order after those.
        order += [p for p in spec.get("placements", {}) if p not in order]
        info = StudyInfo(name=spec["name"], model=spec["model"], placements=tuple(order),
                         baseline=spec.get("baseline") or order[0], baseline_given=spec.get("baseline") is not None,
                         versions=spec.get("versions", {}))
        db.execute("UPDATE studies SET info_json = ? WHERE id = ?", (info.model_dump_json(), study_id))
    marks = ",".join("?" * len(Metrics.model_fields))
    db.execute(f"DELETE FROM metrics WHERE name NOT IN ({marks})", tuple(Metrics.model_fields))


def _labels_v2(labels: dict[str, Any]) -> TrialLabels:
    size = Size(kind="rank", value=labels["rank"]) if "rank" in labels else Size(kind="budget",
                                                                                 value=labels["budget"])
    axes = tuple(sorted((k, v) for k, v in labels.items() if k not in ("placement", "seed", "rank", "budget")))
    return TrialLabels(group=GroupKey(placement=labels["placement"], size=size, axes=axes), seed=labels["seed"])


def _outcome_v2(status: str, error: str | None, failed_step: int | None, result: dict[str, Any] | None,
                metrics: dict[str, float]) -> TrialOutcome | None:
    """The typed outcome of a v1/v2 row. v1 rows have no result JSON: only their metrics table survives."""
    if status == "failed":
        kind = "non_finite" if error and "non-finite" in error else "error"
        return TrialOutcome.failed(Failure(kind=kind, message=error or "failed", step=failed_step))
    if status != "done":
        return None
    r = result if result is not None else metrics
    if r.get("eval_loss") is None:
        return None
    measured = Metrics(eval_loss=r["eval_loss"], perplexity=r.get("perplexity") or math.exp(min(r["eval_loss"], 700)),
                       accuracy=r.get("accuracy"), tokens_per_s=r.get("tokens_per_s"), train_s=r.get("train_s"),
                       peak_mem_mb=r.get("peak_mem_mb"))
    counters = {k: int(r[k]) for k in ("trainable_params", "total_params", "steps", "eval_tokens") if r.get(k)}
    counters |= {"train_tokens": int(r.get("train_tokens") or 0), "label_tokens": int(r.get("label_tokens") or 0)}
    if result is None:
        return TrialOutcome(status="done", metrics=measured, **counters)
    sites = result.get("sites")
    probe = result.get("probe")
    detail = result.get("accuracy_detail")
    return TrialOutcome(
        status="done", metrics=measured, **counters,
        curve=tuple(CurvePoint(step=p["step"], loss=p["loss"], tokens=p["tokens"], lr=p["lr"])
                    for p in result.get("curve", [])),
        evals=tuple(EvalPoint(step=p["step"], eval_loss=p["eval_loss"]) for p in result.get("evals", [])),
        sites=None if not sites else SiteMap(num_layers=sites["num_layers"], roles=tuple(sites["roles"]),
                                             sites=tuple(Site(layer=s[0], role=s[1], rank=s[2])
                                                         for s in sites["sites"])),
        probe=None if not probe else ProbeScores(
            **{k: probe[k] for k in ProbeScores.model_fields if k in probe and k != "sites"},  # v2 had no measure
            sites=tuple(ProbeSite(**{k: s[k] for k in ProbeSite.model_fields if k in s}) for s in probe["sites"])),
        accuracy_detail=None if not detail else AccuracyDetail.model_validate(detail),
        timings=Timings(load_s=result.get("load_s", 0.0), tokenize_s=result.get("tokenize_s", 0.0),
                        eval_s=result.get("eval_s", 0.0)),
        environment=Environment(device=result.get("device", ""), dtype=result.get("dtype", ""),
                                versions=result.get("versions", {})),
        adapter=None if not result.get("adapter_dir") else Adapter(path=result["adapter_dir"],
                                                                    bytes=result.get("adapter_bytes") or 0),
        warnings=tuple(result.get("warnings", ())))


# What a stored ``search:`` read as for each field it may leave out: the SearchSpec defaults until 2026-12-07, when
# ``search: {}`` became the policy chosen by replay (docs/replay.md). Specs are stored as full dumps, but a search
# stored before a field existed lacks it, and would otherwise read it at today's default.
SEARCH_DEFAULTS_V4: dict[str, Any] = {"eta": 3, "finalists": 2, "rungs": None, "min_steps": None,
                                      "rung_examples": None, "min_fraction": None, "screen_lrs": 0,
                                      "stop_when_stable": False, "hedge": 0, "confirm": None}


def _v5_search_defaults_written_out(db: sqlite3.Connection) -> None:
    """v4 → v5: every stored ``search:`` holds every field, at the value it was stored under (so that a change of
    ``search: {}``'s defaults never changes what a stored search was)."""
    for study_id, spec_json in db.execute("SELECT id, spec_json FROM studies").fetchall():
        spec = json.loads(spec_json)
        if isinstance(spec.get("search"), dict):
            spec["search"] = SEARCH_DEFAULTS_V4 | spec["search"]
            db.execute("UPDATE studies SET spec_json = ? WHERE id = ?", (json.dumps(spec), study_id))


# version → steps that bring a store from version-1 to version (SQL statements or Python functions)
MIGRATIONS: dict[int, list[Migration]] = {
    1: [
        """CREATE TABLE studies (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec_json TEXT NOT NULL,
            created_at REAL NOT NULL)""",
        """CREATE TABLE trials (
            id TEXT PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id), position INTEGER NOT NULL,
            config_json TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT, failed_step INTEGER, owner_host TEXT, owner_pid INTEGER, heartbeat_at REAL,
            started_at REAL, finished_at REAL)""",
        """CREATE TABLE metrics (
            trial_id TEXT NOT NULL REFERENCES trials(id), name TEXT NOT NULL, value REAL,
            PRIMARY KEY (trial_id, name))""",
        """CREATE TABLE curves (
            trial_id TEXT NOT NULL REFERENCES trials(id), kind TEXT NOT NULL, step INTEGER NOT NULL,
            value REAL, tokens INTEGER, PRIMARY KEY (trial_id, kind, step))""",
        """CREATE TABLE artifacts (
            trial_id TEXT NOT NULL REFERENCES trials(id), kind TEXT NOT NULL, path TEXT NOT NULL,
            PRIMARY KEY (trial_id, kind))""",
    ],
    2: [
        # v2: completions (must stay ≤ 1 per trial), the full result JSON, and an index for status queries.
        "ALTER TABLE trials ADD COLUMN completions INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE trials ADD COLUMN result_json TEXT",
        "CREATE INDEX trials_by_status ON trials(study_id, status)",
    ],
    3: [_v3_typed_records],
    4: [
        # v4: a placement search's rung results (one per candidate and rung) and its decisions (one per rung).
        """CREATE TABLE rungs (
            study_id INTEGER NOT NULL REFERENCES studies(id), candidate TEXT NOT NULL, rung INTEGER NOT NULL,
            result_json TEXT NOT NULL, recorded_at REAL NOT NULL, PRIMARY KEY (study_id, candidate, rung))""",
        """CREATE TABLE rung_decisions (
            study_id INTEGER NOT NULL REFERENCES studies(id), rung INTEGER NOT NULL, decision_json TEXT NOT NULL,
            recorded_at REAL NOT NULL, PRIMARY KEY (study_id, rung))""",
    ],
    5: [_v5_search_defaults_written_out],
}

SCHEMA_VERSION = max(MIGRATIONS)
