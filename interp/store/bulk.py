"""Bulk loading of a catalog without a harvest: an SAE row, feature statistics and scored labels by COPY.
Used by the catalog benchmark (millions of synthetic labels) and by tests that need features to label.

COPY has no ON CONFLICT, so labels go through a session-temporary staging table and one INSERT ... SELECT,
which also writes their scores by joining back on the explanation's unique key.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
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
    empty = [0] * HIST_BINS
    with conn.transaction(), conn.cursor().copy(
            "COPY features (sae_id, idx, density, n_fired, max_act, mean_act, hist, hist_max) FROM STDIN") as cp:
        for f in rows:
            cp.write_row((sid, f.idx, f.density, f.n_fired, f.max_act, f.mean_act, empty, f.max_act))
            n += 1
    return n


_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS stage_labels (feature int, label text, explainer text, prompt_version text,"
          " is_baseline boolean, scorers text[], simulator text, vals real[], method text); TRUNCATE stage_labels")


def copy_labels(conn: psycopg.Connection, sid: int, rows: Iterable[ScoredLabel]) -> int:
    """Labels and their scores; a label already stored under its unique key is kept as it is (so are its
    scores). Returns the labels read."""
    conn.execute(_STAGE)
    n = 0
    with conn.cursor().copy("COPY stage_labels FROM STDIN") as cp:
        for r in rows:
            cp.write_row((r.feature, r.label, r.explainer, r.prompt_version, r.is_baseline, list(r.scores),
                          r.simulator, list(r.scores.values()), r.method))
            n += 1
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
