"""One console for the whole pipeline. Only the main process prints, so multi-process runs do not repeat lines."""

from __future__ import annotations

import sys

from rich.console import Console

from pipeline.distributed import is_main_process

# Messages are not hard-wrapped (greppable logs); tables get room when the output is a file rather than a terminal.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 140)
out = Console(highlight=False, soft_wrap=True)  # a command's answer (plan, status), for pipes and scripts


def log(message: str, style: str | None = None, markup: bool = True) -> None:
    if is_main_process():
        console.print(message, style=style, markup=markup)


def warn(message: str) -> None:
    log(f"warning: {message}", style="yellow")


def progress():
    """A Rich progress display (bar, done/total, elapsed, ETA) drawn by the main process only; transient, so the log
    keeps the messages rather than finished bars. Only one can be live at a time: never open one inside another."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                    disable=not is_main_process())


def track(items, description: str, total: int | None = None):
    """Iterate over `items` under a progress bar (see progress)."""
    with progress() as bar:
        yield from bar.track(items, total=total, description=description)
