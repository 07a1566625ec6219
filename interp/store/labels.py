"""Explanations and scores: idempotent upserts on the schema's unique keys, and the readers.

A label (sae, feature, explainer, prompt_version) and a score (explanation, scorer, simulator) are written at
most once: a repeat write of a stored result is a no-op, and only a stored failure is overwritten by a new
attempt. So a redelivered task, or a label run again over the same features, never duplicates anything.
"""
from __future__ import annotations

import psycopg
from pydantic import BaseModel

from interp.records import Explanation, Score

from .saes import lock_sae


class ScoreView(BaseModel):
    scorer: str
    simulator: str
    value: float | None
    method: str | None
    failure: str | None = None


class LabelView(BaseModel):
    explainer: str
    prompt_version: str
    label: str | None
    is_baseline: bool
    failure: str | None
    scores: list[ScoreView]


def upsert_explanation(conn: psycopg.Connection, sid: int, ex: Explanation) -> int:
    """Stores a label or its failure; returns its id. A stored label is kept as it is."""
    return upsert_explanations(conn, sid, [ex])[ex.index][0]


def upsert_explanations(conn: psycopg.Connection, sid: int,
                        exs: list[Explanation]) -> dict[int, tuple[int, str | None]]:
    """Several features' labels (one explanation per feature) in one statement; returns {feature: (id, label
    stored after it)}, the label an earlier run's where one was kept. One statement for a worker's batch: a
    round trip and a prepared execution per feature cost the worker's event loop more than the SQL.
    Inside a transaction, so that the SAE's row stays locked until the labels commit (see lock_sae)."""
    lock_sae(conn, sid)
    rows = conn.execute(
        "INSERT INTO explanations (sae_id, feature, explainer, prompt_version, label, is_baseline, prompt_tokens,"
        " completion_tokens, failure) SELECT %s, * FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[],"
        " %s::bool[], %s::int[], %s::int[], %s::text[])"
        " ON CONFLICT (sae_id, feature, explainer, prompt_version) DO UPDATE SET label = EXCLUDED.label,"
        " is_baseline = EXCLUDED.is_baseline, prompt_tokens = explanations.prompt_tokens + EXCLUDED.prompt_tokens,"
        " completion_tokens = explanations.completion_tokens + EXCLUDED.completion_tokens,"
        " failure = EXCLUDED.failure, created = now() WHERE explanations.label IS NULL"
        " RETURNING feature, id, label",
        (sid, [e.index for e in exs], [e.explainer for e in exs], [e.prompt_version for e in exs],
         [e.label for e in exs], [e.is_baseline for e in exs], [e.usage.prompt_tokens for e in exs],
         [e.usage.completion_tokens for e in exs], [e.failure for e in exs])).fetchall()
    out = {f: (i, label) for f, i, label in rows}
    kept = [e for e in exs if e.index not in out]       # a stored label: the update's WHERE left it alone
    if kept:
        out.update((f, (i, label)) for f, i, label in conn.execute(
            "SELECT e.feature, e.id, e.label FROM explanations e JOIN unnest(%s::int[], %s::text[], %s::text[])"
            " AS k(feature, explainer, prompt_version) USING (feature, explainer, prompt_version)"
            " WHERE e.sae_id = %s", ([e.index for e in kept], [e.explainer for e in kept],
                                     [e.prompt_version for e in kept], sid)))
    return out


def upsert_score(conn: psycopg.Connection, explanation_id: int, s: Score) -> None:
    """Stores a score with its per-example breakdown; a stored value is kept, a stored failure replaced."""
    upsert_scores(conn, [(explanation_id, s)])


def upsert_scores(conn: psycopg.Connection, scored: list[tuple[int, Score]]) -> None:
    """upsert_score for several (explanation id, score) pairs, distinct on (id, scorer, simulator), in one
    statement."""
    if not scored:
        return
    ss = [s for _, s in scored]
    # the details go as one JSON array, each score's serialised by pydantic in one call: a jsonb[] parameter cost a
    # worker a json.dumps and an array-quoting pass per score, and a model_dump per scored example
    details = "[" + ",".join(s.model_dump_json(include={"values", "breakdown"}) for s in ss) + "]"
    conn.execute(
        "INSERT INTO scores (explanation_id, scorer, simulator, value, method, prompt_version, prompt_tokens,"
        " completion_tokens, details, failure) SELECT u.eid, u.scorer, u.simulator, u.value, u.method, u.pv, u.pt,"
        " u.ct, d.details, u.failure FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::real[], %s::text[],"
        " %s::text[], %s::int[], %s::int[], %s::text[]) WITH ORDINALITY"
        " AS u(eid, scorer, simulator, value, method, pv, pt, ct, failure, n)"
        " JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS d(details, n) USING (n)"
        " ON CONFLICT (explanation_id, scorer, simulator) DO UPDATE SET value = EXCLUDED.value,"
        " method = EXCLUDED.method, prompt_version = EXCLUDED.prompt_version, details = EXCLUDED.details,"
        " prompt_tokens = scores.prompt_tokens + EXCLUDED.prompt_tokens,"
        " completion_tokens = scores.completion_tokens + EXCLUDED.completion_tokens,"
        " failure = EXCLUDED.failure, created = now()"
        " WHERE scores.value IS NULL AND scores.failure IS NOT NULL",
        ([eid for eid, _ in scored], [s.scorer for s in ss], [s.simulator for s in ss], [s.value for s in ss],
         [s.method for s in ss], [s.prompt_version for s in ss], [s.usage.prompt_tokens for s in ss],
         [s.usage.completion_tokens for s in ss], [s.failure for s in ss], details))


def labels_of(conn: psycopg.Connection, sid: int, index: int) -> list[LabelView]:
    """Every label of one feature, oldest first, each with its scores."""
    rows = conn.execute(
        "SELECT e.explainer, e.prompt_version, e.label, e.is_baseline, e.failure,"
        " coalesce(json_agg(json_build_object('scorer', s.scorer, 'simulator', s.simulator, 'value', s.value,"
        " 'method', s.method, 'failure', s.failure) ORDER BY s.scorer) FILTER (WHERE s.id IS NOT NULL), '[]')"
        " FROM explanations e LEFT JOIN scores s ON s.explanation_id = e.id"
        " WHERE e.sae_id = %s AND e.feature = %s GROUP BY e.id ORDER BY e.id", (sid, index)).fetchall()
    return [LabelView(explainer=r[0], prompt_version=r[1], label=r[2], is_baseline=r[3], failure=r[4],
                      scores=[ScoreView(**s) for s in r[5]]) for r in rows]


class ScoredLabel(BaseModel):
    index: int
    label: str
    explainer: str
    value: float


def best_labels(conn: psycopg.Connection, sid: int, scorer: str, limit: int) -> list[ScoredLabel]:
    """The SAE's best-scoring labels by one scorer, best first, a feature once (by its best label)."""
    rows = conn.execute(
        "SELECT e.feature, e.label, e.explainer, s.value FROM explanations e JOIN scores s ON s.explanation_id = e.id"
        " WHERE e.sae_id = %s AND s.scorer = %s AND s.value IS NOT NULL AND e.label IS NOT NULL"
        " ORDER BY s.value DESC, e.feature LIMIT %s", (sid, scorer, 8 * limit)).fetchall()
    best = {}
    for r in rows:
        best.setdefault(r[0], ScoredLabel(index=r[0], label=r[1], explainer=r[2], value=r[3]))
    return list(best.values())[:limit]
