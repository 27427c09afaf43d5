"""Progress for the long loops of a compile (eager over the validation samples, int8 calibration): a bar
with samples done / total on an interactive terminal, when rich is installed; silent otherwise (build
scripts and CI logs get the totals in the report instead)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
#: loops shorter than this finish before a bar is worth drawing
MIN_ITEMS = 8


def track(items: Iterable[T], total: int, what: str, min_items: int = MIN_ITEMS) -> Iterator[T]:
    """`items`, drawing "what  done/total" on the terminal while they are consumed (when there are at least
    `min_items`: a few slow steps, like compiles, deserve a bar too)."""
    terminal = sys.__stderr__
    if total < min_items or terminal is None or not terminal.isatty():
        yield from items
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield from items
        return
    # The process's own stderr: compile stages run with sys.stderr redirected to keep libraries quiet.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=terminal), transient=True) as bar:
        task = bar.add_task(what, total=total)
        for item in items:
            yield item
            bar.advance(task)
