"""The study store: one SQLite file per study (:mod:`~loraplace.store.sqlite`: the contract, :class:`Store`, all
SQL), its schema and migrations (:mod:`~loraplace.store.migrations`) and the files beside it
(:mod:`~loraplace.store.layout`)."""

from loraplace.store.layout import STATE_DIR, artifacts_dir, trial_dir
from loraplace.store.migrations import SCHEMA_VERSION
from loraplace.store.sqlite import (
    HEARTBEAT_EVERY_S,
    SQLITE_MAGIC,
    STALE_AFTER_HEARTBEATS,
    STALE_AFTER_S,
    TRIAL_STATUSES,
    Owner,
    Store,
    StoreError,
    StudyRecord,
    TrialRecord,
)

__all__ = ["HEARTBEAT_EVERY_S", "SCHEMA_VERSION", "SQLITE_MAGIC", "STALE_AFTER_HEARTBEATS", "STALE_AFTER_S",
           "STATE_DIR", "TRIAL_STATUSES", "Owner", "Store", "StoreError", "StudyRecord", "TrialRecord",
           "artifacts_dir", "trial_dir"]
