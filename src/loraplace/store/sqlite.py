"""The study store: one SQLite file per study. All SQL of loraplace lives in this module.

Contract
--------
* **Typed records in and out.** Writers take :mod:`loraplace.records` (a :class:`TrialOutcome`, a
  :class:`StudyInfo`, :class:`TrialLabels`); readers return immutable :class:`StudyRecord` / :class:`TrialRecord`
  whose outcome is validated again on the way out. Callers never see cursors, rows or result dicts.
* **Crash safety.** WAL journal mode (checked by reading the pragma back) with ``synchronous=NORMAL``: a committed
  transaction survives a process kill. Every write is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) in
  :meth:`Store._tx`, so a kill leaves each row as it was before or after, never in between.
* **Concurrency.** Readers never block the writer and the writer never blocks readers (WAL). ``busy_timeout``
  makes a second writer wait rather than fail with "database is locked". Only the process that runs a study
  writes; Ray workers return outcomes to it.
* **Reads never write.** :meth:`Store.open_readonly` opens the file read-only (``mode=ro``, or ``immutable=1``
  where the directory is read-only and SQLite cannot create its shared-memory file), never migrates it in place
  (an old schema is migrated in an in-memory copy), and refuses, untouched, anything that is not a loraplace store.
* **Trial lifecycle.** ``pending → running → done | failed | interrupted``. :meth:`claim_trial` moves one
  claimable trial to ``running`` atomically and records its owner (host, pid) and a heartbeat; a trial is finished
  only by its current owner (:meth:`record_outcome` refuses otherwise), so no trial completes twice. Trials left
  ``running`` by a dead owner are detected by :meth:`recover_stale` (same host: pid no longer alive; any host:
  heartbeat older than the limit) and become ``interrupted``, which is claimable again.
* **Versioning.** ``schema_version`` holds the version; a writer migrates older stores on open, inside one
  transaction; a store from a newer loraplace is refused with a clear message.

Tables: ``studies`` (spec as written + :class:`StudyInfo`), ``trials`` (labels, resolved trial spec, lifecycle,
the :class:`TrialOutcome` JSON), for a placement search ``rungs`` (one :class:`RungResult` per candidate and rung,
written once) and ``rung_decisions`` (one :class:`RungDecision` per rung, written once: a resumed search that
decides differently is refused), and two projections of the outcome kept for SQL users — ``metrics`` (the
:class:`Metrics` fields only) and ``curves`` — which records are never read back from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loraplace.errors import LoraplaceError
from loraplace.paths import nearest_existing, os_error_text
from loraplace.records import (
    Metrics,
    RungDecision,
    RungResult,
    StudyInfo,
    TrialLabels,
    TrialOutcome,
)
from loraplace.store.migrations import MIGRATIONS, SCHEMA_VERSION

TRIAL_STATUSES = ("pending", "running", "done", "failed", "interrupted")
SQLITE_MAGIC = b"SQLite format 3\x00"

# A running trial's owner writes a heartbeat at most every HEARTBEAT_EVERY_S (runner.Heartbeat, called at step
# boundaries; a Ray driver sends its trials' beats every time it wakes). An owner on another host is presumed dead
# after STALE_AFTER_HEARTBEATS missed beats: beats come only between steps and evals, and one step or one eval of
# a large model on a CPU can take minutes. (On this host a dead owner is found at once: its pid is gone.)
HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_HEARTBEATS = 120
STALE_AFTER_S = HEARTBEAT_EVERY_S * STALE_AFTER_HEARTBEATS


class StoreError(LoraplaceError):
    pass


def _read_only(path: Path) -> StoreError:
    return StoreError(f"{path}: the store cannot be written (permission denied)",
                      "a run needs write access to the store file and its folder (SQLite keeps -wal and -shm files "
                      "beside it); status, report and export only read it. Copy it somewhere writable, or give "
                      "another --store")


def _not_a_folder(path: Path, file: Path) -> StoreError:
    return StoreError(f"{path}: {file} is a file, not a folder", "give a --store path inside a folder (missing "
                      "folders are created), e.g. runs/NAME.db")


def _disk_full(path: Path) -> StoreError:
    folder = path.resolve().parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return StoreError(f"{path}: the disk holding {folder} is full ({free}); the write was rolled back",
                      "free space there (or move the store: --store elsewhere) and run the same command: the study "
                      "resumes from what the store holds")


@contextlib.contextmanager
def _unwritable(path: Path) -> Iterator[None]:
    """SQLite's own words for a store it may not write ("attempt to write a readonly database", "unable to open
    database file") as one clear :class:`StoreError` naming the store."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "readonly" in text or "unable to open database file" in text or "read-only" in text:
            raise _read_only(path) from None
        if "database or disk is full" in text:
            raise _disk_full(path) from None
        raise


@dataclass(frozen=True)
class StudyRecord:
    id: int
    name: str
    spec: dict[str, Any]  # the study spec as the user wrote it (resolved), in its own key order
    info: StudyInfo
    created_at: float


@dataclass(frozen=True)
class TrialRecord:
    id: str
    study_id: int
    position: int
    labels: TrialLabels
    spec: dict[str, Any]  # the resolved TrialSpec as JSON (its hash is the id)
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
    outcome: TrialOutcome | None  # set for done and failed trials

    @property
    def metrics(self) -> Metrics | None:
        """The measured metrics of a done trial (None otherwise)."""
        return self.outcome.metrics if self.outcome is not None else None


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


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _check_store_file(path: Path) -> None:
    """An existing path given as a store must be an SQLite file; anything else is refused untouched."""
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a store file", "give a file path such as runs/x.db")
    if path.stat().st_size == 0 or not _is_sqlite_file(path):
        spec = path.suffix.lower() in (".yaml", ".yml")
        raise StoreError(f"{path} is not a loraplace store (not an SQLite database"
                         + ("; it looks like a study spec" if spec else "") + "); left untouched",
                         f"run the spec with loraplace run {path} (its store: --store PATH, default runs/NAME.db), "
                         "then give that .db here" if spec else
                         "give a new path, or the .db file a study wrote (loraplace run SPEC --store PATH)")


def _not_loraplace(path: Path) -> StoreError:
    return StoreError(f"{path} is an SQLite database but not a loraplace store; left untouched",
                      "give a new path, or the .db file a study wrote (loraplace run SPEC --store PATH)")


def _newer_store(path: Path, version: int) -> StoreError:
    return StoreError(f"{path} was written by a newer loraplace (store schema v{version}; this version reads up to "
                      f"v{SCHEMA_VERSION})", "upgrade loraplace to read this store")


class Store:
    """A writer (``Store(path)``: creates, migrates) or a reader (:meth:`open_readonly`: touches nothing)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, _conn: sqlite3.Connection | None = None):
        self.path = Path(path)
        self.readonly = _conn is not None
        if _conn is not None:
            self._conn = _conn
            return
        if self.path.exists():
            _check_store_file(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise _read_only(self.path) from None
        except OSError as exc:  # a file where a folder should be, a file system that refuses folders (/proc)
            existing = nearest_existing(self.path.parent)
            raise (_not_a_folder(self.path, existing) if not existing.is_dir() else StoreError(
                f"{self.path}: its folder cannot be created ({os_error_text(exc)})",
                "give a --store path on a writable file system")) from None
        try:
            with _unwritable(self.path):
                self._open_writable(busy_timeout_s)
        except PermissionError:
            raise _read_only(self.path) from None

    def _open_writable(self, busy_timeout_s: float) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, in _tx.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        if self._has_tables() and not self._is_loraplace():
            self._conn.close()
            raise _not_loraplace(self.path)
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})",
                             "put the store on a local file system (WAL does not work on some network mounts)")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    @staticmethod
    def check_writable(path: str | Path) -> None:
        """Refuse, before any work, a store this process could not write: the file (if it exists) and the folder
        that gets its -wal/-shm files (or, for a new store, the nearest existing folder above it). Touches
        nothing; opening the store stays the authority (this is the early, cheap answer)."""
        path = Path(path)
        folder = nearest_existing(path.parent)
        if not folder.is_dir():  # notes.txt/x.db: the cause is the file in the way, not a permission
            raise _not_a_folder(path, folder)
        if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK | os.X_OK):
            raise _read_only(path)

    @classmethod
    def open_readonly(cls, path: str | Path) -> Store:
        """Open a store for reading without changing a byte of it; an old schema is migrated in memory."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}", "run a study first: loraplace run SPEC --store PATH")
        _check_store_file(path)
        conn = None
        for query in ("mode=ro", "immutable=1"):  # immutable: a read-only directory where no -shm can be made
            try:
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                break
            except sqlite3.DatabaseError as exc:
                if conn is not None:
                    conn.close()
                conn = None
                if "file is not a database" in str(exc):
                    raise _not_loraplace(path) from None
        if conn is None:
            raise StoreError(f"cannot open {path} for reading", "check the file's permissions")
        store = cls(path, _conn=conn)
        if not store._is_loraplace():
            conn.close()
            raise _not_loraplace(path)
        version = store.schema_version()
        if version > SCHEMA_VERSION:
            conn.close()
            raise _newer_store(path, version)
        if version < SCHEMA_VERSION:  # read an old store through the migration, in a copy held in memory
            memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.backup(memory)
            conn.close()
            store = cls(path, _conn=memory)
            store._apply_migrations()
        return store

    # ------------------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the store; a reader refuses (it never writes)."""
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with _unwritable(self.path), self._transaction() as db:
            yield db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: the write lock is taken up front, so it cannot fail half-way on
        contention; any exception rolls back."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            if self._conn.in_transaction:  # SQLite rolls back by itself on some errors (a full disk: SQLITE_FULL)
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def journal_mode(self) -> str:
        return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    def integrity_check(self) -> str:
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]

    def _has_tables(self) -> bool:
        return self._conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 0

    def _is_loraplace(self) -> bool:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {"schema_version", "studies", "trials"} <= tables

    def schema_version(self) -> int:
        row = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if row is None:
            return 0
        return int(self._conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def _migrate(self) -> None:
        # Fast path without the write lock: a second writer opening a current store never contends for it.
        if self.schema_version() == SCHEMA_VERSION:
            return
        self._apply_migrations()

    def _apply_migrations(self) -> None:
        """Bring the open database (the file, or a reader's in-memory copy) to the current schema."""
        with self._transaction():  # re-read under the lock: another process may have migrated meanwhile
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise _newer_store(self.path, current)
            if current == 0:
                self._conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                self._conn.execute("INSERT INTO schema_version VALUES (0)")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for step in MIGRATIONS[version]:
                    if callable(step):
                        step(self._conn)
                    else:
                        self._conn.execute(step)
                self._conn.execute("UPDATE schema_version SET version = ?", (version,))

    # ------------------------------------------------------------------------------------------ studies

    def write_study(self, info: StudyInfo, spec: dict[str, Any]) -> StudyRecord:
        """The study named ``info.name``, created if new. Its spec and info are replaced by these (trial ids pin
        configs). The spec is stored in its own key order: placement order is meaningful."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM studies WHERE name = ?", (info.name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO studies (name, spec_json, info_json, created_at) VALUES (?, ?, ?, ?)",
                           (info.name, json.dumps(spec), info.model_dump_json(), time.time()))
            else:
                db.execute("UPDATE studies SET spec_json = ?, info_json = ? WHERE id = ?",
                           (json.dumps(spec), info.model_dump_json(), row[0]))
        return self.study(info.name)

    def study(self, name: str | None = None) -> StudyRecord:
        columns = "id, name, spec_json, info_json, created_at"
        if name is None:
            row = self._conn.execute(f"SELECT {columns} FROM studies ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"{self.path} holds no study")
        else:
            row = self._conn.execute(f"SELECT {columns} FROM studies WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path} holds no study named {name!r}")
        return StudyRecord(row[0], row[1], json.loads(row[2]), StudyInfo.model_validate_json(row[3]), row[4])

    def studies(self) -> list[StudyRecord]:
        """Every study in the store, oldest first."""
        rows = self._conn.execute("SELECT id, name, spec_json, info_json, created_at FROM studies ORDER BY id")
        return [StudyRecord(r[0], r[1], json.loads(r[2]), StudyInfo.model_validate_json(r[3]), r[4]) for r in rows]

    def add_trials(self, study_id: int, trials: list[tuple[str, TrialLabels, dict[str, Any]]]) -> int:
        """Register trials (id, labels, resolved spec) as pending; ids already present are kept as they are. New
        trials come after every trial already there (a tuned study's other seeds, an --extend's cells), in the
        order given: the order trials are claimed and listed in. (Before 2026-12-03 each call numbered its trials
        from 0, so later additions interleaved with earlier ones; ties are listed in insertion order.)"""
        with self._tx() as db:
            before = db.total_changes
            start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM trials WHERE study_id = ?",
                               (study_id,)).fetchone()[0]
            for position, (trial_id, labels, spec) in enumerate(trials, start=start):
                config = {"labels": labels.model_dump(mode="json"), "trial": spec}
                db.execute("INSERT OR IGNORE INTO trials (id, study_id, position, config_json) VALUES (?, ?, ?, ?)",
                           (trial_id, study_id, position, json.dumps(config, sort_keys=True)))
            return db.total_changes - before

    # ------------------------------------------------------------------------------------------ lifecycle

    def recover_stale(self, study_id: int, stale_after_s: float = STALE_AFTER_S) -> list[str]:
        """Mark ``running`` trials whose owner is dead as ``interrupted``: on this host, an owner whose process is
        gone; on any host, one silent for ``stale_after_s``. Returns their ids."""
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
            rows = db.execute(f"SELECT id FROM trials WHERE study_id = ? AND status IN ({marks}) "
                              "ORDER BY position, rowid", (study_id, *statuses)).fetchall()
            ids = [r[0] for r in rows if only is None or r[0] in only]
            if not ids:
                return None
            trial_id = ids[0]
            db.execute("UPDATE trials SET status = 'running', attempts = attempts + 1, owner_host = ?, owner_pid = ?, "
                       "heartbeat_at = ?, started_at = ?, error = NULL, failed_step = NULL, outcome_json = NULL "
                       "WHERE id = ?", (owner.host, owner.pid, now, now, trial_id))
            db.execute("DELETE FROM metrics WHERE trial_id = ?", (trial_id,))
            db.execute("DELETE FROM curves WHERE trial_id = ?", (trial_id,))
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

    def record_outcome(self, trial_id: str, outcome: TrialOutcome, owner: Owner | None = None) -> None:
        """Finish a trial with its outcome, in one transaction: done (metrics, curves, artifact) or failed."""
        owner = owner or Owner.current()
        with self._tx() as db:
            self._owned(db, trial_id, owner)
            if outcome.status == "failed":
                assert outcome.failure is not None  # guaranteed by TrialOutcome's validator
                db.execute("UPDATE trials SET status = 'failed', error = ?, failed_step = ?, finished_at = ?, "
                           "owner_pid = NULL, outcome_json = ? WHERE id = ?",
                           (outcome.failure.message, outcome.failure.step, time.time(), outcome.model_dump_json(),
                            trial_id))
                return
            assert outcome.metrics is not None
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                           [(trial_id, k, v) for k, v in outcome.metrics.measured().items()])
            db.executemany("INSERT INTO curves VALUES (?, 'train_loss', ?, ?, ?)",
                           [(trial_id, p.step, p.loss, p.tokens) for p in outcome.curve])
            db.executemany("INSERT INTO curves VALUES (?, 'eval_loss', ?, ?, NULL)",
                           [(trial_id, p.step, p.eval_loss) for p in outcome.evals])
            if outcome.adapter is not None:
                db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, 'adapter', ?)",
                           (trial_id, outcome.adapter.path))
            db.execute("UPDATE trials SET status = 'done', completions = completions + 1, finished_at = ?, "
                       "owner_pid = NULL, outcome_json = ? WHERE id = ?",
                       (time.time(), outcome.model_dump_json(), trial_id))

    def interrupt_trial(self, trial_id: str, reason: str = "interrupted", owner: Owner | None = None) -> None:
        owner = owner or Owner.current()
        with self._tx() as db:
            self._owned(db, trial_id, owner)
            db.execute("UPDATE trials SET status = 'interrupted', error = ?, owner_pid = NULL WHERE id = ?",
                       (reason, trial_id))

    # ------------------------------------------------------------------------------------------ reads

    _TRIAL_COLUMNS = ("id, study_id, position, config_json, status, attempts, completions, error, failed_step, "
                      "owner_host, owner_pid, heartbeat_at, started_at, finished_at, outcome_json")

    def _record(self, row: tuple) -> TrialRecord:
        config = json.loads(row[3])
        try:
            outcome = TrialOutcome.model_validate_json(row[14]) if row[14] else None
            labels = TrialLabels.model_validate(config["labels"])
        except ValidationError as exc:
            raise StoreError(f"{self.path}: trial {row[0]} holds a record this loraplace cannot read ({exc})",
                             "the store may have been edited by hand or by another program") from None
        return TrialRecord(row[0], row[1], row[2], labels, config["trial"], row[4], row[5], row[6], row[7], row[8],
                           row[9], row[10], row[11], row[12], row[13], outcome)

    def trial(self, trial_id: str) -> TrialRecord:
        row = self._conn.execute(f"SELECT {self._TRIAL_COLUMNS} FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            raise StoreError(f"no trial {trial_id}")
        return self._record(row)

    def trials(self, study_id: int) -> list[TrialRecord]:
        rows = self._conn.execute(f"SELECT {self._TRIAL_COLUMNS} FROM trials WHERE study_id = ? "
                                  "ORDER BY position, rowid", (study_id,)).fetchall()
        return [self._record(r) for r in rows]

    def counts(self, study_id: int) -> dict[str, int]:
        rows = self._conn.execute("SELECT status, COUNT(*) FROM trials WHERE study_id = ? GROUP BY status",
                                  (study_id,)).fetchall()
        return {status: 0 for status in TRIAL_STATUSES} | dict(rows)

    # ------------------------------------------------------------------------------------------ search

    def record_rung(self, study_id: int, result: RungResult) -> None:
        """Record a candidate's result at a rung. A done result is final: recording another is refused (a failed
        one may be replaced by a retry)."""
        with self._tx() as db:
            row = db.execute("SELECT result_json FROM rungs WHERE study_id = ? AND candidate = ? AND rung = ?",
                             (study_id, result.candidate, result.rung)).fetchone()
            if row is not None and RungResult.model_validate_json(row[0]).status == "done":
                raise StoreError(f"rung {result.rung} of candidate {result.candidate} is already recorded",
                                 "is another loraplace run of this search running?")
            db.execute("INSERT OR REPLACE INTO rungs VALUES (?, ?, ?, ?, ?)",
                       (study_id, result.candidate, result.rung, result.model_dump_json(), time.time()))

    def rung_results(self, study_id: int) -> list[RungResult]:
        """Every recorded rung result of a search, by rung then in the order recorded."""
        rows = self._conn.execute("SELECT result_json FROM rungs WHERE study_id = ? ORDER BY rung, recorded_at",
                                  (study_id,)).fetchall()
        return [self._read(RungResult, r[0]) for r in rows]

    def record_decision(self, study_id: int, decision: RungDecision) -> None:
        """Record a rung's decision once; the same decision again is a no-op, another one is refused."""
        with self._tx() as db:
            row = db.execute("SELECT decision_json FROM rung_decisions WHERE study_id = ? AND rung = ?",
                             (study_id, decision.rung)).fetchone()
            if row is not None:
                if not RungDecision.model_validate_json(row[0]).same_as(decision):
                    raise StoreError(f"rung {decision.rung} was decided differently before "
                                     f"(kept {', '.join(RungDecision.model_validate_json(row[0]).kept)}); the "
                                     f"results now give {', '.join(decision.kept)}",
                                     "the store's rung results were changed, or loraplace's rule changed")
                return
            db.execute("INSERT INTO rung_decisions VALUES (?, ?, ?, ?)",
                       (study_id, decision.rung, decision.model_dump_json(), time.time()))

    def rung_decisions(self, study_id: int) -> list[RungDecision]:
        rows = self._conn.execute("SELECT decision_json FROM rung_decisions WHERE study_id = ? ORDER BY rung",
                                  (study_id,)).fetchall()
        return [self._read(RungDecision, r[0]) for r in rows]

    def _read(self, kind: type, text: str):
        try:
            return kind.model_validate_json(text)
        except ValidationError as exc:
            raise StoreError(f"{self.path}: holds a {kind.__name__} this loraplace cannot read ({exc})",
                             "the store may have been edited by hand or by another program") from None
