"""Progress of long steps outside Lightning's own loops: sample grids, FID, the NFE sweep, OT fits, caches.

One context manager, :func:`progress`, drawn like the trainer's progress bar:

- the trainer has a :class:`~lightning.pytorch.callbacks.RichProgressBar` -> a task in its live display (or a
  transient rich bar of our own when that display is not running);
- any other progress bar, or no trainer -> a tqdm bar that disappears when done;
- ``--trainer.enable_progress_bar false`` (``trainer.progress_bar_callback is None``), a non-zero rank or
  ``enabled=False`` -> nothing at all;
- output that is not a terminal (CI logs, ``> log.txt``) -> no bar, one line per phase on stderr when it ends (and
  only when it took ``min_line_seconds`` or has a result), never carriage-return spam.

Usage::

    with progress(trainer, total=len(batches), description="FID heun@35") as bar:
        for batch in batches:
            ...
            bar.advance()
        bar.result("FID 12.3")
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class Progress:
    """Handle yielded by :func:`progress`: ``advance()`` the bar, ``result()`` the line printed at the end."""

    def __init__(self, total: int | None, description: str) -> None:
        self.total, self.description = total, description
        self.count = 0
        self.message: str | None = None
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()

    def advance(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more units done; keyword arguments are shown after the bar (e.g. ``loss=0.3``)."""
        self.count += n
        if postfix:
            self.postfix = postfix
        self._draw()

    def __call__(self, n: int = 1, **postfix: Any) -> None:
        self.advance(n, **postfix)

    def result(self, message: str) -> None:
        """The outcome of the phase, printed as one line when it ends (e.g. ``"FID 12.3"``)."""
        self.message = message

    def seconds(self) -> float:
        """Seconds since the phase began."""
        return time.perf_counter() - self.start

    def summary(self) -> str:
        """``"<description>: <result> (<count>/<total>, <seconds> s)"``."""
        done = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        head = f"{self.description}: {self.message}" if self.message else f"{self.description}: done"
        return f"{head} ({done}, {self.seconds():.1f} s)"

    def _postfix_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.postfix.items())

    def _draw(self) -> None:  # overridden by the drawing handles
        pass

    def _close(self) -> None:
        pass


class _TqdmProgress(Progress):
    def __init__(self, total: int | None, description: str, stream: TextIO) -> None:
        super().__init__(total, description)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=stream)

    def _draw(self) -> None:
        self._bar.n = self.count
        if self.postfix:
            self._bar.set_postfix_str(self._postfix_text(), refresh=False)
        self._bar.refresh()

    def _close(self) -> None:
        self._bar.close()


class _RichProgress(Progress):
    def __init__(self, total: int | None, description: str, live: Any | None) -> None:
        super().__init__(total, description)
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._own = live is None
        self._progress = live or RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        if self._own:
            self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    @property
    def console(self) -> Any:
        """The rich console the bar draws on (lines printed here appear above the live display)."""
        return self._progress.console

    def _draw(self) -> None:
        text = self._postfix_text()
        description = f"{self.description} {text}" if text else self.description
        self._progress.update(self._task, completed=self.count, description=description)
        # Lightning's live display redraws only when asked (soft_refresh); our own rich bar refreshes itself
        getattr(self._progress, "soft_refresh", self._progress.refresh)()

    def _close(self) -> None:
        self._progress.remove_task(self._task)
        if self._own:
            self._progress.stop()


def progress_enabled(source: L.Trainer | bool | None) -> bool:
    """Whether :func:`progress` draws anything for ``source`` (a trainer: rank 0 with an enabled progress bar)."""
    if source is None or isinstance(source, bool):
        return source is None or source
    bar = source.progress_bar_callback
    return bar is not None and bool(source.is_global_zero) and not getattr(bar, "is_disabled", False)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def progress(
    source: L.Trainer | bool | None,
    total: int | None,
    description: str,
    min_line_seconds: float = 2.0,
    stream: TextIO | None = None,
) -> Iterator[Progress]:
    """A progress bar (or, off a terminal, one line at the end) for a step of ``total`` units.

    Args:
        source: the trainer whose progress-bar settings decide the style and whether to draw; a bool for code
            without a trainer (``True``: tqdm/line); ``None`` is ``True``.
        total: number of units (``None``: unknown).
        description: what is running, e.g. ``"sample grid"`` or ``"NFE sweep heun NFE 35 rho 7"``.
        min_line_seconds: off a terminal, phases shorter than this and without a result print nothing.
        stream: where bars and lines go (default: bars on ``sys.stdout`` like Lightning's, the lines printed off a
            terminal on ``sys.stderr`` with the log messages, so that piped stdout stays clean).

    Yields:
        A :class:`Progress`: call ``advance()`` per unit and optionally ``result(message)``.
    """
    line_stream = stream or sys.stderr
    stream = stream or sys.stdout
    if not progress_enabled(source):
        yield Progress(total, description)
        return
    bar = source.progress_bar_callback if isinstance(source, L.Trainer) else None
    handle: Progress
    if isinstance(bar, RichProgressBar):
        from rich import get_console

        live = bar.progress if bar.progress is not None and not bar._progress_stopped else None
        terminal = (live.console if live is not None else get_console()).is_terminal
        # off a terminal rich draws nothing: keep only the final line
        handle = _RichProgress(total, description, live) if terminal else Progress(total, description)
    elif _is_terminal(stream):
        handle, terminal = _TqdmProgress(total, description, stream), True
    else:
        handle, terminal = Progress(total, description), False
    try:
        yield handle
    finally:
        handle._close()
    show = handle.message is not None or (not terminal and handle.seconds() >= min_line_seconds)
    if show:
        _print_line(handle, stream if terminal else line_stream)


def _print_line(handle: Progress, stream: TextIO) -> None:
    line = handle.summary()
    if isinstance(handle, _RichProgress):
        handle.console.print(line, markup=False, highlight=False)
    elif isinstance(handle, _TqdmProgress):
        from tqdm.auto import tqdm

        tqdm.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)
