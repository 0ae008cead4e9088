"""How long a running (or stopped) study still needs, from its own finished trials: what ``loraplace status`` says
below the trials table.

The estimate is the median wall time of the done trials (from claim to record, the evals included) times the
trials left, less what the running ones have already run, divided by how many run at once now. A tuned study's
other seeds are not in the store until its selection pass ends; they are counted from the spec. A search is not
estimated (its rung runs are not trials). Reads only the records; imports no torch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from loraplace.records import StudyInfo
from loraplace.store import TrialRecord
from loraplace.tuning import tuned_cell

LEFT = ("pending", "interrupted", "running")  # what a plain rerun runs (failed trials need --retry-failed)


@dataclass(frozen=True)
class TimeLeft:
    seconds: float  # wall time of what is left, at `parallel` trials at a time
    trial_s: float  # the median wall time of a done trial
    done: int  # the done trials that median is over
    left: int  # trials in the store still to finish (pending, interrupted, running)
    running: int
    to_add: int  # a tuned study's other seeds' trials, not in the store until its selection pass ends

    @property
    def parallel(self) -> int:
        return max(1, self.running)


def trials_to_add(info: StudyInfo, seeds: list[int], trials: list[TrialRecord]) -> int:
    """A tuned grid's trials that its selection pass has yet to add: each cell (placement × size × axes, the LR
    dropped) at every seed outside the selection pass, less those already added. (``tune.extend`` may add LRs
    past an edge besides: not counted.)"""
    if not info.tune_lrs or info.search:
        return 0
    others = [s for s in seeds if s not in info.tune_seeds]
    cells = {tuned_cell(t.labels.group) for t in trials}
    added = sum(1 for t in trials if t.labels.seed in others)
    return max(0, len(cells) * len(others) - added)


def time_left(trials: list[TrialRecord], now: float, to_add: int = 0) -> TimeLeft | None:
    """The estimate (None: no done trial to time, or nothing left)."""
    durations = [t.finished_at - t.started_at for t in trials
                 if t.status == "done" and t.finished_at is not None and t.started_at is not None]
    left = [t for t in trials if t.status in LEFT]
    if not durations or not (left or to_add):
        return None
    trial_s = statistics.median(durations)
    running = [t for t in left if t.status == "running"]
    work = trial_s * (len(left) - len(running) + to_add)
    work += sum(max(0.0, trial_s - (now - t.started_at)) if t.started_at is not None else trial_s for t in running)
    return TimeLeft(work / max(1, len(running)), trial_s, len(durations), len(left), len(running), to_add)
