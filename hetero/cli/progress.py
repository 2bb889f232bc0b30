"""Where the command speaks: the console (wide in logs) and plain progress lines for logs.

A terminal gets rich's progress bars; a file, a pipe or a CI log gets one line per finished training epoch (of
`hetero train`, and of the supernet and each fine-tuning in `hetero search`) and per stage of `hetero run`
instead, since progress bars show nothing there.
"""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console


def log_width() -> int | None:
    """Rich squeezes everything to 80 columns when stdout is not a terminal, cutting tables in CI logs and
    piped output: give those 200 columns, unless COLUMNS says otherwise (None: rich's own choice)."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200


console = Console(width=log_width())


class LogLines:
    """Progress as plain lines where stdout is a log (a file, a pipe, CI), in which progress bars show nothing:
    one line per finished training epoch and per stage of `hetero run`, with the time since the command began."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and not console.is_terminal
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        from datetime import timedelta

        from hetero import distributed

        if self.enabled and distributed.is_main():  # under torchrun, rank 0 speaks for all
            elapsed = timedelta(seconds=round(time.perf_counter() - self.started))
            console.print(f"{text} [{elapsed} elapsed]", markup=False, highlight=False)

    def epoch(self, end) -> None:
        """A training callback (hetero.training.EpochEnd): the family's epochs, or a search's supernet and
        fine-tuning epochs, which name their stage."""
        if end.stage:
            self.say(f"{end.stage} epoch {end.epoch}/{end.epochs}: loss {end.loss:.4f}")
        else:
            self.say(f"epoch {end.epoch}/{end.epochs} (phase {end.phase + 1}): loss {end.loss:.4f}")
