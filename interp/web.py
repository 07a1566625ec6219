"""The dashboard: plain server-rendered HTML (escaped at every insertion), a little JavaScript in
`interp/static/app.js` for search-as-you-type and live job progress, no build step. Pages read through the
same store functions as the API and the CLI."""
from __future__ import annotations

import math
from html import escape

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from interp.api import Conn, FeatureIndex, SAEName
from interp.store.features import FeatureView, feature_view
from interp.store.labels import LabelView
from interp.store.saes import list_saes
from sae.errors import InputError
from sae.records import Example

HIST_W, HIST_H = 500, 120       # the histogram's SVG size in pixels
TINT = "255,128,0"              # RGB of the activation tint; its alpha is the activation over the feature's max


def page(title: str, body: str, script: bool = True) -> HTMLResponse:
    js = '<script src="/static/app.js" defer></script>' if script else ""
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · interp</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="stylesheet" href="/static/style.css">{js}</head><body>'
        f'<nav><a href="/">search</a> <a href="/ui/jobs">jobs</a> <a href="/docs">API</a>'
        f' <a href="/login">token</a></nav><main>{body}</main></body></html>')


def error_page(status: int, detail: str) -> HTMLResponse:
    out = page(f"error {status}", f'<h1>{status}</h1><p class="error">{escape(detail)}</p>', script=False)
    out.status_code = status
    return out


def feature_href(sae: str, idx: int) -> str:
    from urllib.parse import quote

    return f"/ui/saes/{quote(sae, safe='')}/features/{idx}"


# ---------------------------------------------------------------- pieces of the feature page
def shown_tokens(tokens: list[str]) -> list[str]:
    """Each token as it reads in running text: WordPiece continuations (##) join the previous token, other
    WordPiece tokens start a word; byte-level BPE tokens carry their own spaces (so some begin with one)."""
    if not any(t.startswith("##") for t in tokens) and any(t.startswith(" ") for t in tokens):
        return tokens
    return [t[2:] if t.startswith("##") else " " + t for t in tokens]


def snippet_html(e: Example, tokens: list[str], max_act: float) -> str:
    """One snippet, each token tinted by its activation over the feature's max; the value shows on hover."""
    spans = []
    for t, a in zip(shown_tokens(tokens), e.acts):
        # any activation gets a visible floor of tint, so a weak one is not mistaken for none
        alpha = 0.1 + 0.9 * min(1.0, a / max_act) if a > 0 and max_act > 0 else 0.0
        style = f' style="background:rgba({TINT},{alpha:.2f})"' if alpha > 0 else ""
        spans.append(f'<span class="tok{" on" if a > 0 else ""}"{style} title="{a:.3g}">'
                     f'{escape(t.replace(chr(10), "⏎"))}</span>')
    tag = f'<span class="bin">bin {e.quantile_bin}</span>' if e.quantile_bin is not None else ""
    return f'<div class="snippet"><span class="max">{e.max_act:.3g}</span>{tag}{"".join(spans)}</div>'


def histogram_svg(hist: list[int], hist_max: float) -> str:
    """The activation histogram: equal-width bins over (0, hist_max], bar heights on a log scale (counts span
    orders of magnitude), each bar's range and count on hover."""
    if not hist:
        return '<p class="muted">no histogram</p>'
    top, n = max(hist), len(hist)
    w = HIST_W / n
    bars = []
    for i, c in enumerate(hist):
        h = 0.0 if c == 0 else max(1.0, HIST_H * math.log1p(c) / math.log1p(top))
        lo, hi = hist_max * i / n, hist_max * (i + 1) / n
        bars.append(f'<rect x="{i * w:.1f}" y="{HIST_H - h:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}">'
                    f'<title>({lo:.3g}, {hi:.3g}]: {c:,}</title></rect>')
    return (f'<svg class="hist" viewBox="0 0 {HIST_W} {HIST_H + 16}" width="{HIST_W}" height="{HIST_H + 16}"'
            f' role="img" aria-label="activation histogram">{"".join(bars)}'
            f'<text x="0" y="{HIST_H + 14}">0</text>'
            f'<text x="{HIST_W}" y="{HIST_H + 14}" text-anchor="end">{hist_max:.3g}</text></svg>')


def labels_html(labels: list[LabelView]) -> str:
    if not labels:
        return '<p class="muted">no labels yet</p>'
    rows = []
    for lab in labels:
        text = escape(lab.label) if lab.label is not None else f'<em>failed: {escape(lab.failure or "")}</em>'
        scores = "".join(
            f'<span class="score" title="{escape(s.method or "")} {escape(s.simulator)}">{escape(s.scorer)} '
            f'{"n/a" if s.value is None else f"{s.value:.3f}"}</span>' for s in lab.scores)
        base = ' <span class="tag">baseline</span>' if lab.is_baseline else ""
        rows.append(f'<tr><td class="label">{text}</td><td>{escape(lab.explainer)}{base}</td>'
                    f'<td>{escape(lab.prompt_version)}</td><td>{scores}</td></tr>')
    return ('<table class="labels"><tr><th>label</th><th>explainer</th><th>prompt</th><th>scores</th></tr>'
            + "".join(rows) + "</table>")


def logits_html(v: FeatureView) -> str:
    if not v.top_logits and not v.bottom_logits:
        return ""

    def toks(ts):
        return "".join(f'<code>{escape(repr(t))}</code> ' for t in ts or [])

    return (f'<h2>Logit effects</h2><p>promotes: <span class="promoted">{toks(v.top_logits)}</span></p>'
            f'<p>suppresses: <span class="suppressed">{toks(v.bottom_logits)}</span></p>')


SETS = (("explain", "Explain set", "the explainer saw these"),
        ("score", "Score set", "held out: only the scorers saw these"))


def snippets_html(v: FeatureView) -> str:
    out = []
    for split, title, why in SETS:
        exs = [e for e in v.examples.examples if e.split == split]
        out.append(f'<section class="set set-{split}"><h2>{title} <small>({len(exs)}; {why})</small></h2>')
        for kind in ("top", "quantile", "random"):
            group = [e for e in exs if e.kind == kind]
            if group:
                out.append(f'<h3>{kind}</h3>' + "".join(
                    snippet_html(e, e.tokens or [f"<{t}>" for t in e.token_ids], v.max_act) for e in group))
        out.append("</section>")
    return "".join(out)


def feature_page(v: FeatureView) -> HTMLResponse:
    stats = (f'density <b>{v.density:.4%}</b> · fired <b>{v.n_fired:,}</b> · max <b>{v.max_act:.3g}</b>'
             f' · mean <b>{v.mean_act:.3g}</b>')
    nav = ""
    if v.index > 0:
        nav += f'<a href="{feature_href(v.sae, v.index - 1)}">← {v.index - 1}</a> '
    nav += f'<a href="{feature_href(v.sae, v.index + 1)}">{v.index + 1} →</a>'
    body = (f'<h1>{escape(v.sae)} <span class="muted">feature</span> {v.index}</h1><p class="stats">{stats}</p>'
            f'<p>{nav}</p><h2>Labels</h2>{labels_html(v.labels)}<h2>Activation histogram</h2>'
            f'{histogram_svg(v.hist, v.hist_max)}{logits_html(v)}{snippets_html(v)}')
    return page(f"{v.sae} {v.index}", body)


# ---------------------------------------------------------------- pages
def home_page(saes) -> HTMLResponse:
    rows = "".join(
        f'<tr><td>{escape(s.name)}</td><td>{escape(s.model)} L{s.layer} {escape(s.site)}</td>'
        f'<td>{s.n_features:,}</td><td>{escape(s.arch)}</td>'
        f'<td><form class="goto" data-sae="{escape(s.name)}"><input name="idx" type="number" min="0"'
        f' max="{s.n_features - 1}" placeholder="feature #" required><button>open</button></form></td></tr>'
        for s in saes)
    body = ('<h1>Feature catalog</h1><input id="q" type="search" placeholder="search labels, e.g. numbers"'
            ' autocomplete="off" autofocus aria-label="search labels"><div id="results"></div>'
            '<h2>SAEs</h2><table class="saes"><tr><th>name</th><th>reads</th><th>features</th><th>arch</th>'
            f'<th></th></tr>{rows}</table>')
    return page("search", body)


JOBS_BODY = """<h1>Labelling jobs</h1>
<form id="newjob"><fieldset><legend>Queue a labelling job (needs the write token, see <a href="/login">token</a>)
</legend><label>SAE <select name="sae">{options}</select></label>
<label>features <input name="features" placeholder="0:100" size="10"></label>
<label><input type="checkbox" name="unlabeled"> unlabeled</label>
<label>explainer <input name="explainer" value="baseline"></label>
<label>scorers <input name="scorers" value="embedding"></label>
<button>queue</button></fieldset></form>
<form id="watch"><label>job id <input name="id" type="number" min="1" required></label><button>watch</button></form>
<p id="joberror" class="error"></p><div id="jobs"></div>"""


def add_pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(c: Conn):
        return home_page(list_saes(c))

    @app.get("/ui/saes/{name}/features/{idx}", response_class=HTMLResponse, include_in_schema=False)
    def feature(c: Conn, name: SAEName, idx: FeatureIndex):
        try:
            return feature_page(feature_view(c, name, idx))
        except InputError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/ui/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs(c: Conn):
        options = "".join(f'<option>{escape(s.name)}</option>' for s in list_saes(c))
        return page("jobs", JOBS_BODY.format(options=options))

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login():
        body = ('<h1>Token</h1><p>Reads need a token only when the server sets INTERP_API_READ_TOKEN; writes'
                ' (queueing and cancelling jobs) need INTERP_API_TOKEN. The token stays in this browser.</p>'
                '<form id="login"><input name="token" type="password" autocomplete="off" size="40">'
                ' <button>save</button> <button type="button" id="logout">forget</button></form>'
                '<p id="saved" class="muted"></p>')
        return page("token", body)
