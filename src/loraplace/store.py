"""The study store: one SQLite file per study. All SQL of loraplace lives in this module.

Contract
--------
* **Crash safety.** WAL journal mode (checked by reading the pragma back) with ``synchronous=NORMAL``: a committed
  transaction survives a process kill. Every write is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) in
  :meth:`Store._tx`, so a kill leaves each row as it was before or after, never in between.
* **Concurrency.** Readers never block the writer and the writer never blocks readers (WAL). ``busy_timeout``
  makes a second writer wait rather than fail with "database is locked". Only the process that runs a study
  writes; Ray workers return results to it.
* **Trial lifecycle.** ``pending → running → done | failed | interrupted``. :meth:`claim_trial` moves one
  claimable trial to ``running`` atomically and records its owner (host, pid) and a heartbeat; a trial is finished
  only by its current owner (:meth:`finish_trial` refuses otherwise), so no trial completes twice. Trials left
  ``running`` by a dead owner are detected by :meth:`recover_stale` (same host: pid no longer alive; any host:
  heartbeat older than the limit) and become ``interrupted``, which is claimable again.
* **Versioning.** ``schema_version`` holds the version; older stores are migrated on open, inside one
  transaction; a store from a newer loraplace is refused with a clear message.
* **Records out are immutable** (frozen dataclasses); callers never see cursors or rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplace.errors import LoraplaceError

SCHEMA_VERSION = 2
TRIAL_STATUSES = ("pending", "running", "done", "failed", "interrupted")

# version → statements that bring a store from version-1 to version
_MIGRATIONS: dict[int, list[str]] = {
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
}


class StoreError(LoraplaceError):
    pass


@dataclass(frozen=True)
class StudyRecord:
    id: int
    name: str
    spec: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class TrialRecord:
    id: str
    study_id: int
    position: int
    config: dict[str, Any]
    status: str
    attempts: int
    completions: int
    error: str | None
    failed_step: int | None
    owner_host: str | None
    owner_pid: int | None
    heartbeat_at: float | None
    started_at: float | None
    finished_at: float | None
    metrics: dict[str, float]
    result: dict[str, Any] | None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise StoreError(f"no store at {self.path}", "run a study first: loraplace run SPEC --store PATH")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, in _tx.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})",
                             "put the store on a local file system (WAL does not work on some network mounts)")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    # ------------------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken up front so it cannot fail half-way on contention."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def journal_mode(self) -> str:
        return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    def integrity_check(self) -> str:
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]

    def schema_version(self) -> int:
        row = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if row is None:
            return 0
        return int(self._conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def _migrate(self) -> None:
        # Fast path without the write lock: readers (status, report) opening a current store never contend
        # with the running study for it.
        if self.schema_version() == SCHEMA_VERSION:
            return
        with self._tx() as db:  # re-read under the lock: another process may have migrated meanwhile
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer loraplace (store schema v{current}; this "
                                 f"version reads up to v{SCHEMA_VERSION})", "upgrade loraplace to read this store")
            if current == 0:
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (version,))

    # ------------------------------------------------------------------------------------------ studies

    def open_study(self, name: str, spec: dict[str, Any]) -> StudyRecord:
        """The study of that name, created if new. Its spec is replaced by ``spec`` (trial ids pin configs)."""
        payload = json.dumps(spec, sort_keys=True)
        with self._tx() as db:
            row = db.execute("SELECT id FROM studies WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO studies (name, spec_json, created_at) VALUES (?, ?, ?)",
                           (name, payload, time.time()))
            else:
                db.execute("UPDATE studies SET spec_json = ? WHERE id = ?", (payload, row[0]))
        return self.study(name)

    def study(self, name: str | None = None) -> StudyRecord:
        if name is None:
            rows = self._conn.execute("SELECT id, name, spec_json, created_at FROM studies ORDER BY id").fetchall()
            if not rows:
                raise StoreError(f"{self.path} holds no study")
            row = rows[-1]
        else:
            row = self._conn.execute("SELECT id, name, spec_json, created_at FROM studies WHERE name = ?",
                                     (name,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path} holds no study named {name!r}")
        return StudyRecord(row[0], row[1], json.loads(row[2]), row[3])

    def add_trials(self, study_id: int, trials: list[tuple[str, dict[str, Any]]]) -> int:
        """Register trials (id, resolved config) as pending; ids already present are kept as they are."""
        with self._tx() as db:
            before = db.total_changes
            for position, (trial_id, config) in enumerate(trials):
                db.execute("INSERT OR IGNORE INTO trials (id, study_id, position, config_json) VALUES (?, ?, ?, ?)",
                           (trial_id, study_id, position, json.dumps(config, sort_keys=True)))
            return db.total_changes - before

    # ------------------------------------------------------------------------------------------ lifecycle

    def recover_stale(self, study_id: int, stale_after_s: float = 600.0) -> list[str]:
        """Mark ``running`` trials whose owner is dead as ``interrupted``; returns their ids."""
        me = Owner.current()
        now = time.time()
        recovered = []
        with self._tx() as db:
            rows = db.execute("SELECT id, owner_host, owner_pid, heartbeat_at FROM trials "
                              "WHERE study_id = ? AND status = 'running'", (study_id,)).fetchall()
            for trial_id, host, pid, heartbeat in rows:
                dead_here = host == me.host and pid is not None and pid != me.pid and not _pid_alive(pid)
                silent = heartbeat is None or now - heartbeat > stale_after_s
                if dead_here or silent:
                    db.execute("UPDATE trials SET status = 'interrupted', error = ?, owner_pid = NULL "
                               "WHERE id = ? AND status = 'running'",
                               (f"owner {host}:{pid} died while running it", trial_id))
                    recovered.append(trial_id)
        return recovered

    def claim_trial(self, study_id: int, owner: Owner | None = None, retry_failed: bool = False,
                    only: set[str] | None = None) -> TrialRecord | None:
        """Atomically take the first claimable trial (pending/interrupted, failed with ``retry_failed``)."""
        owner = owner or Owner.current()
        statuses = ("pending", "interrupted", "failed") if retry_failed else ("pending", "interrupted")
        now = time.time()
        with self._tx() as db:
            marks = ",".join("?" * len(statuses))
            rows = db.execute(f"SELECT id FROM trials WHERE study_id = ? AND status IN ({marks}) ORDER BY position",
                              (study_id, *statuses)).fetchall()
            ids = [r[0] for r in rows if only is None or r[0] in only]
            if not ids:
                return None
            trial_id = ids[0]
            db.execute("UPDATE trials SET status = 'running', attempts = attempts + 1, owner_host = ?, owner_pid = ?, "
                       "heartbeat_at = ?, started_at = ?, error = NULL, failed_step = NULL WHERE id = ?",
                       (owner.host, owner.pid, now, now, trial_id))
        return self.trial(trial_id)

    def heartbeat(self, trial_id: str, owner: Owner | None = None) -> None:
        owner = owner or Owner.current()
        with self._tx() as db:
            db.execute("UPDATE trials SET heartbeat_at = ? WHERE id = ? AND owner_host = ? AND owner_pid = ?",
                       (time.time(), trial_id, owner.host, owner.pid))

    def _owned(self, db: sqlite3.Connection, trial_id: str, owner: Owner) -> None:
        row = db.execute("SELECT status, owner_host, owner_pid FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise StoreError(f"no trial {trial_id}")
        if row[0] != "running" or (row[1], row[2]) != (owner.host, owner.pid):
            raise StoreError(f"trial {trial_id} is not running under {owner.host}:{owner.pid} "
                             f"(status {row[0]}, owner {row[1]}:{row[2]}); result discarded")

    def finish_trial(self, trial_id: str, result: dict[str, Any], owner: Owner | None = None) -> None:
        """Record a finished trial: status done, scalar metrics, curves, artifacts — in one transaction."""
        owner = owner or Owner.current()
        scalars = {k: float(v) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        with self._tx() as db:
            self._owned(db, trial_id, owner)
            db.execute("DELETE FROM metrics WHERE trial_id = ?", (trial_id,))
            db.execute("DELETE FROM curves WHERE trial_id = ?", (trial_id,))
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?)", [(trial_id, k, v) for k, v in scalars.items()])
            db.executemany("INSERT INTO curves VALUES (?, 'train_loss', ?, ?, ?)",
                           [(trial_id, p["step"], p["loss"], p.get("tokens")) for p in result.get("curve", [])])
            db.executemany("INSERT INTO curves VALUES (?, 'eval_loss', ?, ?, NULL)",
                           [(trial_id, p["step"], p["eval_loss"]) for p in result.get("evals", [])])
            if result.get("adapter_dir"):
                db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, 'adapter', ?)",
                           (trial_id, result["adapter_dir"]))
            db.execute("UPDATE trials SET status = 'done', completions = completions + 1, finished_at = ?, "
                       "owner_pid = NULL, result_json = ? WHERE id = ?",
                       (time.time(), json.dumps(result, default=str), trial_id))

    def fail_trial(self, trial_id: str, error: str, step: int | None = None, owner: Owner | None = None) -> None:
        owner = owner or Owner.current()
        with self._tx() as db:
            self._owned(db, trial_id, owner)
            db.execute("UPDATE trials SET status = 'failed', error = ?, failed_step = ?, finished_at = ?, "
                       "owner_pid = NULL WHERE id = ?", (error, step, time.time(), trial_id))

    def interrupt_trial(self, trial_id: str, reason: str = "interrupted", owner: Owner | None = None) -> None:
        owner = owner or Owner.current()
        with self._tx() as db:
            self._owned(db, trial_id, owner)
            db.execute("UPDATE trials SET status = 'interrupted', error = ?, owner_pid = NULL WHERE id = ?",
                       (reason, trial_id))

    # ------------------------------------------------------------------------------------------ reads

    _TRIAL_COLUMNS = ("id, study_id, position, config_json, status, attempts, completions, error, failed_step, "
                      "owner_host, owner_pid, heartbeat_at, started_at, finished_at, result_json")

    def _record(self, row: tuple) -> TrialRecord:
        metrics = dict(self._conn.execute("SELECT name, value FROM metrics WHERE trial_id = ?", (row[0],)).fetchall())
        return TrialRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7], row[8], row[9],
                           row[10], row[11], row[12], row[13], metrics, json.loads(row[14]) if row[14] else None)

    def trial(self, trial_id: str) -> TrialRecord:
        row = self._conn.execute(f"SELECT {self._TRIAL_COLUMNS} FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise StoreError(f"no trial {trial_id}")
        return self._record(row)

    def trials(self, study_id: int) -> list[TrialRecord]:
        rows = self._conn.execute(f"SELECT {self._TRIAL_COLUMNS} FROM trials WHERE study_id = ? ORDER BY position",
                                  (study_id,)).fetchall()
        return [self._record(r) for r in rows]

    def curve(self, trial_id: str, kind: str = "train_loss") -> list[tuple[int, float, int | None]]:
        return self._conn.execute("SELECT step, value, tokens FROM curves WHERE trial_id = ? AND kind = ? "
                                  "ORDER BY step", (trial_id, kind)).fetchall()

    def counts(self, study_id: int) -> dict[str, int]:
        rows = self._conn.execute("SELECT status, COUNT(*) FROM trials WHERE study_id = ? GROUP BY status",
                                  (study_id,)).fetchall()
        return {status: 0 for status in TRIAL_STATUSES} | dict(rows)
