"""Progress bars for long work (calibration, passes, checks), on stderr via rich."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressReporter:
    """``reporter(label, done, total)`` advances the bar named ``label`` (made on first use)."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[label], completed=done, total=total)

    def step(self, label: str) -> None:
        """A one-step task shown as done (for stages without inner progress)."""
        self(label, 1, 1)


@contextmanager
def progress_bars(enabled: bool = True):
    """Yield a ProgressReporter; bars render only on an interactive stderr."""
    console = Console(file=sys.stderr)
    if not enabled or not console.is_terminal:
        yield ProgressReporter(None)
        return
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield ProgressReporter(progress)
