"""A progress bar on stderr (images/s, ETA) when it is a terminal; silent otherwise."""

from __future__ import annotations

import sys


class ProgressReporter:
    """Context manager wrapping rich's progress bar; `start(total)` then `update(done, total)`."""

    def __init__(self, enabled: bool = True, description: str = "working") -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self) -> "ProgressReporter":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            class _Rate(TextColumn):
                def render(self, task):  # images per second
                    speed = task.finished_speed or task.speed
                    from rich.text import Text

                    return Text(f"{speed:.1f} img/s" if speed else "-- img/s")

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TaskProgressColumn(), _Rate(""), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
        return self

    def start(self, total: int) -> None:
        if self._progress is not None:
            if self._task is None:
                self._task = self._progress.add_task(self.description, total=total)
            else:
                self._progress.update(self._task, total=total)

    def update(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
