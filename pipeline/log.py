"""One console for the whole pipeline. Only the main process prints, so multi-process runs do not repeat lines."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Messages are not hard-wrapped (greppable logs); tables get room when the output is a file rather than a terminal.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 140)
out = Console(highlight=False, soft_wrap=True)  # a command's answer (plan, status), for pipes and scripts


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def log(message: str, style: str | None = None, markup: bool = True) -> None:
    if is_main_process():
        console.print(message, style=style, markup=markup)


def warn(message: str) -> None:
    log(f"warning: {message}", style="yellow")
