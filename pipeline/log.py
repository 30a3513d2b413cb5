"""One console for the whole pipeline. Only the main process prints, so multi-process runs do not repeat lines."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False)  # progress and messages
out = Console(highlight=False, soft_wrap=True)  # a command's answer (plan, status), for pipes and scripts


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def log(message: str, style: str | None = None, markup: bool = True) -> None:
    if is_main_process():
        console.print(message, style=style, markup=markup)


def warn(message: str) -> None:
    log(f"warning: {message}", style="yellow")
