"""Hybrid label search: full text, trigram and semantic candidates (see `interp.store.search`), fused by
reciprocal rank, ordered by fused relevance and then by score.

Reciprocal rank fusion needs no calibration between arms whose scores mean different things (ts_rank,
word_similarity, cosine): each arm only contributes 1 / (RRF_K + rank) for the labels it ranked.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import psycopg
from pydantic import BaseModel

from interp.store import search as store
from interp.store.saes import require_sae
from sae.errors import InputError

RRF_K = 60
MAX_QUERY_CHARS = 1000   # labels are a sentence; a longer query is a mistake, and costs every arm
MAX_LIMIT = 1000
# The semantic arm's embedding and walk (see start_semantic). Two workers: the API serves concurrent searches
# from its thread pool.
_EMBED_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="query-embed")


def ranks(ranked: Sequence[tuple[int, float]]) -> dict[int, float]:
    """Fractional ranks of (key, relevance) pairs sorted best first: keys of equal relevance share the mean of
    the positions they span (0.9, 0.5, 0.5, 0.1 -> 1, 2.5, 2.5, 4). So two labels an arm cannot tell apart fuse
    equal and are then ordered by score, and a hundred ties (every label holding "car" in "card" or "carry")
    count as rank 50.5, not as a hundred first places that would crowd out another arm's first."""
    out: dict[int, float] = {}
    start = 0
    for end in range(1, len(ranked) + 1):
        if end == len(ranked) or ranked[end][1] != ranked[start][1]:
            for key, _ in ranked[start:end]:
                out[key] = (start + 1 + end) / 2
            start = end
    return out


def rrf(rankings: Sequence[Mapping[int, float]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion: each key scores the sum over the rankings (key -> rank, from 1) that hold it of
    1 / (k + rank)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for key, rank in ranking.items():
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return fused


class SearchResult(BaseModel):
    sae: str
    index: int
    label: str
    explainer: str
    scores: dict[str, float]
    density: float | None
    show: str                   # the command that shows the feature
    relevance: float            # the fused score


def parse_density(spec: str | None) -> tuple[float | None, float | None]:
    """'A:B', 'A:' or ':B' -> (A, B), either side None when open."""
    if spec is None:
        return None, None
    lo, sep, hi = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        out = (float(lo) if lo.strip() else None, float(hi) if hi.strip() else None)
    except ValueError:
        raise InputError(f"--density takes A:B (either side may be empty), e.g. 0.001:0.05; got {spec!r}") from None
    if out[0] is not None and out[1] is not None and out[0] > out[1]:
        raise InputError(f"--density {spec}: the lower bound is above the upper one")
    return out


def check_scorer(scorer: str | None) -> None:
    from interp.scorers import SCORERS

    if scorer is not None and scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")


def clean_query(text: str) -> str:
    """The query as the arms take it, or one line on why there is none. NUL is dropped: Postgres text cannot
    hold it."""
    q = " ".join(text.replace("\x00", " ").split())
    if not q:
        raise InputError("the search query is empty")
    if len(q) > MAX_QUERY_CHARS:
        raise InputError(f"the search query is {len(q):,} characters; at most {MAX_QUERY_CHARS:,}")
    return q


def build_filters(conn: psycopg.Connection, sae: str | None, scorer: str | None, min_score: float | None,
                  density: str | None) -> store.Filters:
    check_scorer(scorer)
    lo, hi = parse_density(density)
    return store.Filters(sae_id=require_sae(conn, sae) if sae is not None else None, scorer=scorer,
                         min_score=min_score, density_min=lo, density_max=hi)


@dataclass
class SemanticStart:
    """The semantic arm under way: the synced index, and on a worker thread the query's vector and its first
    `k` neighbours."""
    index: object
    k: int
    walk: Future            # -> (vector, [(explanation id, cosine)])


@lru_cache(maxsize=1024)
def query_vector(query: str, encoder):
    """The query's unit MiniLM vector, kept for the next search of the same text: the API and the dashboard
    search the same text again as filters, limits or pages change, and the embedding is most of a search."""
    from interp import label_index

    vec = label_index.embed([query], encoder)[0]
    vec.flags.writeable = False
    return vec


def start_semantic(conn: psycopg.Connection, query: str, flt: store.Filters, index_dir: str,
                   n: int = store.TOP_N, warn: Callable[[str], None] = lambda line: None) -> SemanticStart:
    """Syncs the index (here: that needs the connection), then embeds the query and walks the index on a worker
    thread while the text arms run in Postgres: torch and usearch both release the GIL, so on two cores the
    embedding (~15-20 ms) and the walk (~5 ms at 1 M labels) overlap the SQL instead of adding to it. Raises
    SemanticUnavailable when the model or the index cannot be had."""
    from interp import label_index

    encoder = label_index.load_encoder()
    if label_index.embed_pending(conn, encoder) == label_index.EMBED_PER_SEARCH:
        warn(f"more than {label_index.EMBED_PER_SEARCH:,} new labels wait for embeddings; the semantic arm "
             "covers them over the next searches")
    index = label_index.sync_index(conn, index_dir)
    # An SAE filter alone usually keeps most neighbours (one SAE fills the catalog): 2n suffices, and costs a
    # tenth of 10n in the HNSW walk (1 ms against 10 ms at 200 k labels). Without filters, SQL still drops
    # neighbours whose label was deleted since the index file was written.
    k = n if flt == store.Filters() else 2 * n

    def walk():
        vec = query_vector(query, encoder)
        return vec, label_index.nearest(index, vec, k)

    return SemanticStart(index, k, _EMBED_POOL.submit(walk))


def semantic_arm(conn: psycopg.Connection, query: str, flt: store.Filters, index_dir: str,
                 n: int = store.TOP_N, warn: Callable[[str], None] = lambda line: None,
                 started: SemanticStart | None = None) -> store.Ranked:
    """Nearest labels to the query's MiniLM embedding that pass the filters. The usearch index cannot filter, so
    with filters set it is asked for twice the neighbours, and for ten times as many only when the filters in
    SQL leave fewer than n of those (a list cut short by the similarity floor has nothing more to offer)."""
    from interp import label_index

    started = started or start_semantic(conn, query, flt, index_dir, n, warn)
    vec, near = started.walk.result()
    kept = store.filter_ranked(conn, near, flt, n)
    if len(kept) < n and len(near) == started.k and flt != store.Filters():     # asked for 2n: now 10n
        kept = store.filter_ranked(conn, label_index.nearest(started.index, vec, 10 * n), flt, n)
    return kept


def contenders(fused: Mapping[int, float], limit: int) -> list[int]:
    """The candidates that can still be in the first `limit` results: every one fused at least as high as the
    limit-th (ties at the cut included, since the score breaks them). Only these rows are read back, not the
    hundreds every arm offers."""
    values = sorted(fused.values(), reverse=True)
    if len(values) <= limit:
        return list(fused)
    cut = values[limit - 1]
    return [i for i, v in fused.items() if v >= cut]


def search(conn: psycopg.Connection, text: str, *, sae: str | None = None, scorer: str | None = None,
           min_score: float | None = None, density: str | None = None, limit: int = 20,
           semantic: bool = True, index_dir: str | None = None,
           warn: Callable[[str], None] = lambda line: None) -> list[SearchResult]:
    """The fused results, best first. `warn` gets one line when the semantic arm cannot run."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InputError(f"--limit must be between 1 and {MAX_LIMIT}, got {limit}")
    query = clean_query(text)
    flt = build_filters(conn, sae, scorer, min_score, density)
    from interp.label_index import SemanticUnavailable

    def semantic_off(e: SemanticUnavailable) -> None:
        warn(f"semantic search is off: {e}; using full text and trigram only")

    started = None
    if semantic:
        from interp.settings import get_settings

        index_dir = index_dir or get_settings().search_index_dir
        try:
            started = start_semantic(conn, query, flt, index_dir, warn=warn)
        except SemanticUnavailable as e:
            semantic_off(e)
    arms = [store.fulltext_arm(conn, query, flt)]
    # Trigrams are for typos and substrings. A query whose words are common lexemes already fills the full-text
    # arm, and its trigrams are common too: their GIN posting lists are the longest, so the arm is skipped.
    if len(arms[0]) < store.TOP_N:
        try:
            arms.append(store.trigram_arm(conn, query, flt))
        except store.ArmTimeout as e:
            warn(str(e))
    if started is not None:
        try:
            arms.append(semantic_arm(conn, query, flt, index_dir, started=started))
        except SemanticUnavailable as e:
            semantic_off(e)
    fused = rrf([ranks(arm) for arm in arms])
    hits = store.label_hits(conn, contenders(fused, limit))

    def order(h: store.LabelHit):
        best = h.scores.get(scorer) if scorer else max(h.scores.values(), default=None)
        return -fused[h.id], -(best if best is not None else float("-inf")), h.id

    hits.sort(key=order)
    return [SearchResult(sae=h.sae, index=h.index, label=h.label, explainer=h.explainer, scores=h.scores,
                         density=h.density, show=f"interp feature {shlex.quote(h.sae)} {h.index}",
                         relevance=fused[h.id]) for h in hits[:limit]]
