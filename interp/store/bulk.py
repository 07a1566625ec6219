"""Bulk loading of a catalog without a harvest: an SAE row, feature statistics and scored labels by COPY.
Used by the catalog benchmark (millions of synthetic labels) and by tests that need features to label.

COPY has no ON CONFLICT, so labels go through a session-temporary staging table and one INSERT ... SELECT,
which also writes their scores by joining back on the explanation's unique key.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .saes import SAEMeta, name_taken

HIST_BINS = 50


@dataclass
class FeatureStats:
    idx: int
    density: float
    max_act: float
    mean_act: float
    n_fired: int = 0


@dataclass
class ScoredLabel:
    feature: int
    label: str
    explainer: str = "bench"
    prompt_version: str = "v1"
    is_baseline: bool = False
    scores: dict[str, float] = field(default_factory=dict)   # scorer -> value
    simulator: str = "bench"
    method: str = "json"


def create_sae(conn: psycopg.Connection, name: str, meta: SAEMeta) -> int:
    """A new SAE row; one line if the name is taken."""
    if conn.execute("SELECT 1 FROM saes WHERE name = %s", (name,)).fetchone():
        raise name_taken(name)
    return conn.execute(
        "INSERT INTO saes (name, model, layer, site, d_in, n_features, arch, k, metrics, path)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (name, meta.model, meta.layer, meta.site, meta.d_in, meta.n_features, meta.arch, meta.k,
         Jsonb(meta.metrics), meta.path)).fetchone()[0]


def copy_features(conn: psycopg.Connection, sid: int, rows: Iterable[FeatureStats]) -> int:
    """Feature statistics with an empty histogram; returns the rows written."""
    n = 0
    # COPY text lines built here: per-value adaptation (an array of 50 ints a row) would cost more than the COPY
    tail = "\t{" + ",".join(["0"] * HIST_BINS) + "}\t"
    with conn.transaction(), conn.cursor().copy(
            "COPY features (sae_id, idx, density, n_fired, max_act, mean_act, hist, hist_max) FROM STDIN") as cp:
        for chunk in _chunks(rows):
            cp.write("".join(f"{sid}\t{f.idx}\t{f.density!r}\t{f.n_fired}\t{f.max_act!r}\t{f.mean_act!r}{tail}"
                             f"{f.max_act!r}\n" for f in chunk))
            n += len(chunk)
    return n


def _chunks(rows: Iterable, size: int = 10_000):
    chunk = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(s: str) -> str:
    """A value in COPY's text format."""
    return s.translate(_ESCAPE)


def _array(items) -> str:
    """A Postgres array literal of text items, each quoted (then escaped for COPY by the caller)."""
    return "{" + ",".join('"' + str(x).replace("\\", "\\\\").replace('"', '\\"') + '"' for x in items) + "}"


_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS stage_labels (feature int, label text, explainer text, prompt_version text,"
          " is_baseline boolean, scorers text[], simulator text, vals real[], method text); TRUNCATE stage_labels")


def copy_labels(conn: psycopg.Connection, sid: int, rows: Iterable[ScoredLabel]) -> int:
    """Labels and their scores; a label already stored under its unique key is kept as it is (so are its
    scores). Returns the labels read."""
    conn.execute(_STAGE)
    n = 0
    with conn.cursor().copy("COPY stage_labels FROM STDIN") as cp:
        for chunk in _chunks(rows):
            cp.write("".join(
                f"{r.feature}\t{_text(r.label)}\t{_text(r.explainer)}\t{_text(r.prompt_version)}\t"
                f"{'t' if r.is_baseline else 'f'}\t{_text(_array(r.scores))}\t{_text(r.simulator)}\t"
                f"{{{','.join(repr(float(v)) for v in r.scores.values())}}}\t{_text(r.method)}\n" for r in chunk))
            n += len(chunk)
    with conn.transaction():
        conn.execute(
            "WITH ins AS (INSERT INTO explanations (sae_id, feature, explainer, prompt_version, label, is_baseline)"
            " SELECT %s, feature, explainer, prompt_version, label, is_baseline FROM stage_labels"
            " ON CONFLICT DO NOTHING RETURNING id, feature, explainer, prompt_version)"
            " INSERT INTO scores (explanation_id, scorer, simulator, value, method)"
            " SELECT ins.id, u.scorer, s.simulator, u.value, s.method FROM ins"
            " JOIN stage_labels s USING (feature, explainer, prompt_version),"
            " unnest(s.scorers, s.vals) AS u(scorer, value)", (sid,))
        conn.execute("TRUNCATE stage_labels")
    return n


# The label search indexes (as migrations 001 and 004 create them). A bulk load drops them and builds them after:
# one sorted build is several times faster than maintaining a GIN index row by row.
SEARCH_INDEXES = {
    "explanations_label_trgm": "CREATE INDEX IF NOT EXISTS explanations_label_trgm ON explanations"
                               " USING gin (label gin_trgm_ops)",
    "explanations_label_tsv": "CREATE INDEX IF NOT EXISTS explanations_label_tsv ON explanations USING gin (label_tsv)",
}


def drop_search_indexes(conn: psycopg.Connection) -> None:
    for name in SEARCH_INDEXES:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(name)))


def create_search_indexes(conn: psycopg.Connection, maintenance_work_mem: str = "1GB") -> None:
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
    for ddl in SEARCH_INDEXES.values():
        conn.execute(ddl)
    conn.execute("ANALYZE explanations")
