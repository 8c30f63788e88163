"""One rich progress bar for every long job: driven by (stage, done, total) calls, with ETA;
silent when disabled (JSON output, tests)."""

from __future__ import annotations

from rich.console import Console


class StageBar:
    def __init__(self, title: str = "", enabled: bool = True, console: Console | None = None):
        self.enabled, self._task = enabled, None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"[bold]{title}[/]"), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console or Console(stderr=True))

    def __enter__(self) -> StageBar:
        if self.enabled:
            self._bar.start()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._task is None:
            self._task = self._bar.add_task(stage, total=total, completed=done)
        self._bar.update(self._task, completed=done, total=total, description=stage)

    def __exit__(self, exc_type, *exc) -> bool:
        if self.enabled:
            _stop(self._bar, failed=exc_type is not None)
        return False


def _stop(bar, failed: bool) -> None:
    if failed:
        # A failed job's bar goes (Progress.stop would add a blank line): the error line is
        # then all that stderr shows.
        bar.live.transient = True
        bar.live.stop()
    else:
        bar.stop()


class SearchProgress:
    """Progress over a search's true evaluations, showing generation, hypervolume and cache hits;
    called with each generation's history record."""

    def __init__(self, enabled: bool, total: int, console: Console | None = None):
        self.enabled, self.total, self._task = enabled, total, None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]search[/]"), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console or Console(stderr=True),
                                 transient=True)

    def __enter__(self) -> SearchProgress:
        if self.enabled:
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __call__(self, record: dict) -> None:
        if self.enabled:
            hits, misses = record["cache_hits"], record["cache_misses"]
            self._bar.update(self._task, completed=min(record["evaluations"], self.total),
                             description=f"gen {record['generation']}  HV {record['hypervolume']:.4f}  "
                                         f"cache hits {hits}/{hits + misses}")

    def __exit__(self, exc_type, *exc) -> bool:
        if self.enabled:
            _stop(self._bar, failed=exc_type is not None)
        return False
