"""Terminal rendering of catalog records (rich): a feature's stats, histogram sparkline, labels and snippets."""
from __future__ import annotations

import numpy as np

from interp.store.features import FeatureView
from sae.records import Example

_BARS = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    top = max(counts, default=0)
    if top == 0:
        return " " * len(counts)
    # log scale: activation histograms span orders of magnitude
    return "".join(_BARS[0 if c == 0 else 1 + int(7 * np.log1p(c) / np.log1p(top))] for c in counts)


def snippet(e: Example, mark_at: float = 0.0) -> str:
    """The window's tokens with every activating token «marked» and its activation after it."""
    toks = e.tokens or [f"<{t}>" for t in e.token_ids]
    # WordPiece vocabularies (BERT) mark continuations with ##; byte-level BPE tokens carry their own spaces
    wordpiece = any(t.startswith("##") for t in toks)
    parts = []
    for t, a in zip(toks, e.acts):
        if wordpiece:
            t = t[2:] if t.startswith("##") else " " + t
        t = t.replace("\n", "⏎")
        parts.append(f"«{t}»{a:.2g}" if a > mark_at else t)
    return "".join(parts).strip()


def print_feature(v: FeatureView, n: int = 8) -> None:
    from rich.console import Console
    from rich.markup import escape

    con = Console(highlight=False)
    con.print(f"[bold]{escape(v.sae)}[/] feature [bold]{v.index}[/]  density {v.density:.3%}  "
              f"fired {v.n_fired}  max {v.max_act:.3g}  mean {v.mean_act:.3g}")
    con.print(f"histogram (0, {v.hist_max:.3g}]  |{sparkline(v.hist)}|")
    if v.top_logits:
        con.print(f"promotes: {escape(' '.join(map(repr, v.top_logits)))}")
        con.print(f"suppresses: {escape(' '.join(map(repr, v.bottom_logits or [])))}")
    for lab in v.labels:
        scores = ", ".join(f"{s.scorer}={s.value:.3f}" if s.value is not None else f"{s.scorer}=n/a"
                           for s in lab.scores)
        text = lab.label if lab.label is not None else f"(failed: {lab.failure})"
        con.print(f"label [{escape(lab.explainer)} {escape(lab.prompt_version)}]: {escape(text)}"
                  + (f"  [{escape(scores)}]" if scores else ""))
    groups = [("top", "explain"), ("top", "score"), ("quantile", "explain"), ("random", "score")]
    for kind, split in groups:
        exs = [e for e in v.examples.examples if e.kind == kind and e.split == split]
        if not exs:
            continue
        con.print(f"[bold]{kind} / {split}[/] ({len(exs)})")
        for e in exs[:n]:
            tag = f"bin {e.quantile_bin} " if e.quantile_bin is not None else ""
            con.print(f"  {tag}{e.max_act:6.3g}  {escape(snippet(e))}")
