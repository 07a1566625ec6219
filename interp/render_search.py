"""The table `interp search` prints without --json (kept beside interp.render, which other commands own)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from interp.search import SearchResult


def print_results(results: list[SearchResult], console: Console | None = None) -> None:
    console = console or Console()
    if not results:
        console.print("no label matches")
        return
    scorers = sorted({s for r in results for s in r.scores})
    table = Table(show_lines=False)
    for col in ("sae", "index", "label", "explainer", *scorers, "density", "show"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.sae, str(r.index), r.label, r.explainer,
                      *(f"{r.scores[s]:.3f}" if s in r.scores else "" for s in scorers),
                      "" if r.density is None else f"{r.density:.2e}", r.show)
    console.print(table)
