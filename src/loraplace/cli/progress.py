"""Progress bars: a trial's (and a study's) training steps, a probe's batches."""

from __future__ import annotations

import contextlib
import time

from rich.markup import escape

from loraplace.cli.common import err


@contextlib.contextmanager
def probe_progress(quiet: bool, batches: int):
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    # Counts batches (a warmup probe: its training steps, then its scoring batches).
    with Progress(TextColumn("probe"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("probe", total=batches)
        yield lambda done, total: bar.update(task, completed=done, total=total)


class TrainProgress:
    """Rich progress: an optional study bar over trials, and a bar over optimizer steps with loss, real tokens/s
    and ETA (one bar, reset per trial — per group of fused trials, with their mean loss and summed tokens). Silent
    when quiet. Called as ``progress(step, total, loss, tokens)``."""

    def __init__(self, quiet: bool, description: str = "train"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = None if quiet else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=False)
        self.task = None
        self.study = None
        self.description = description
        self.t0 = 0.0
        self.tokens0 = 0
        self.last_loss = "…"
        # Not a terminal (nohup, a log file, CI): rich draws no bars there, so a long trial would log nothing until
        # it ends. A plain line every tenth of its steps instead (and when it starts), with loss and tokens/s.
        self.plain = self.progress is not None and not self.progress.console.is_terminal
        self.next_line = 0

    def __enter__(self):
        if self.progress is not None and not self.plain:  # not a terminal: plain lines only, no bars' last frame
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def start_study(self, total: int) -> None:
        if self.progress is None:
            return
        if self.study is None:
            self.study = self.progress.add_task("study", total=total, info="")
        else:  # more trials joined the run (a tuned study's other seeds)
            # By id, not position: ``tasks`` is a list, and the rung and trial bars removed before it shift it.
            shown = next(t.total for t in self.progress.tasks if t.id == self.study)
            self.progress.update(self.study, total=max(total, shown or 0))

    def trial_done(self, done: int, failed: int) -> None:
        if self.progress is not None and self.study is not None:
            self.progress.update(self.study, completed=done + failed, info=f"{done} done, {failed} failed")

    def new_trial(self, description: str) -> None:
        self.description = description
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
        self.task = None

    def __call__(self, step: int, total: int, loss: float | None, tokens: int) -> None:
        if self.progress is None:
            return
        if self.task is None:  # rate measured from the first step on: model load and tokenising excluded
            self.task = self.progress.add_task(self.description, total=total, info="loss …")
            self.t0, self.tokens0 = time.perf_counter(), tokens
            self.progress.update(self.task, completed=step)
            if self.plain:
                resumed = f", continuing its saved state from step {step - 1}" if step > 1 else ""
                self._line(f"{self.description}: training, {total} steps{resumed}")
                self.next_line = step + max(1, total // 10)
            return
        if loss is not None:
            self.last_loss = f"{loss:.4f}"
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        info = f"loss {self.last_loss}  {(tokens - self.tokens0) / elapsed:,.0f} tok/s"
        self.progress.update(self.task, completed=step, info=info)
        if self.plain and step >= self.next_line and step < total:
            self._line(f"{self.description}: step {step}/{total}  {info}")
            self.next_line = step + max(1, total // 10)

    def _line(self, text: str) -> None:
        assert self.progress is not None
        self.progress.console.print(f"{time.strftime('%H:%M:%S')} {escape(text)}", highlight=False)
