"""Label search in SQL: the candidate arms, each bounded by its own index and returning its top N explanation
ids with the filters already applied, the label embeddings (the semantic arm's source of truth), and the rows
that a fused result shows.

Why each arm is bounded: `ORDER BY ts_rank` (or word_similarity) over every match of a common word ranks
millions of rows. Each arm therefore first takes at most `pool` candidates in an inner query that has no ORDER
BY: the planner answers it with the GIN bitmap scan (or, for a very common term, a sequential scan that meets a
match on nearly every page), and the LIMIT stops the heap scan after `pool` matches whatever the term's
frequency. Only those candidates are ranked. A rare term has fewer than `pool` matches, so its ranking is exact;
a common one is ranked among the first `pool` matches in table order, which is the price of a bounded cost.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql
from pydantic import BaseModel

POOL = 2000     # candidates an arm ranks: bounds the work of a common word
TOP_N = 200     # candidates an arm returns to the fusion
# labels the trigram arm reads: each costs a heap read and a word_similarity (~9 us at 1 M labels), so the arm
# stays near 10 ms when a query word's stem is common
TRIGRAM_POOL = 1000
TRIGRAM_TIMEOUT_MS = 2000


class ArmTimeout(Exception):
    """An arm ran past its time limit; the message says so in one line."""


@dataclass(frozen=True)
class Filters:
    """What every arm applies inside its SQL. None means no condition."""
    sae_id: int | None = None
    scorer: str | None = None
    min_score: float | None = None
    density_min: float | None = None
    density_max: float | None = None

    def where(self, e: str = "e") -> tuple[sql.Composable, dict]:
        """The conditions on explanations aliased `e`, composed only of the filters that are set (so the
        planner never sees `$1 IS NULL OR ...` disjunctions that defeat an index), and their parameters."""
        alias = sql.Identifier(e)
        parts = [sql.SQL("{}.label IS NOT NULL").format(alias)]
        params: dict = {}
        if self.sae_id is not None:
            parts.append(sql.SQL("{}.sae_id = %(f_sae)s").format(alias))
            params["f_sae"] = self.sae_id
        if self.density_min is not None or self.density_max is not None:
            parts.append(sql.SQL("EXISTS (SELECT 1 FROM features f WHERE f.sae_id = {e}.sae_id AND f.idx = {e}.feature"
                                 " AND f.density >= %(f_dlo)s AND f.density <= %(f_dhi)s)").format(e=alias))
            params["f_dlo"] = self.density_min if self.density_min is not None else float("-inf")
            params["f_dhi"] = self.density_max if self.density_max is not None else float("inf")
        if self.scorer is not None or self.min_score is not None:
            cond = [sql.SQL("s.explanation_id = {}.id AND s.value IS NOT NULL").format(alias)]
            if self.scorer is not None:
                cond.append(sql.SQL("s.scorer = %(f_scorer)s"))
                params["f_scorer"] = self.scorer
            if self.min_score is not None:
                cond.append(sql.SQL("s.value >= %(f_min)s"))
                params["f_min"] = self.min_score
            parts.append(sql.SQL("EXISTS (SELECT 1 FROM scores s WHERE {})").format(sql.SQL(" AND ").join(cond)))
        return sql.SQL(" AND ").join(parts), params


Ranked = list[tuple[int, float]]   # (explanation id, the arm's own relevance), best first


def fulltext_arm(conn: psycopg.Connection, query: str, flt: Filters, n: int = TOP_N, pool: int = POOL) -> Ranked:
    """Explanation ids matching `query` (websearch syntax: words, "phrases", or, -not) by the stored tsvector,
    best ts_rank first among at most `pool` candidates. A query of stop words alone matches nothing."""
    where, params = flt.where()
    stmt = sql.SQL(
        "SELECT c.id, ts_rank(c.label_tsv, websearch_to_tsquery('english', %(q)s)) AS r FROM"
        " (SELECT e.id, e.label_tsv FROM explanations e"
        " WHERE e.label_tsv @@ websearch_to_tsquery('english', %(q)s) AND {where} LIMIT %(pool)s) c"
        " ORDER BY r DESC, c.id LIMIT %(n)s"
    ).format(where=where)
    if conn.execute("SELECT numnode(websearch_to_tsquery('english', %s))", (query,)).fetchone()[0] == 0:
        return []
    return [(r[0], r[1]) for r in conn.execute(stmt, {**params, "q": query, "pool": pool, "n": n})]


# Similar label words taken per query word, best first: a short word ("bin") is a prefix of dozens, and each
# one's lexeme widens the full-text lookup.
WORD_EXPANSIONS = 32
# Query words whose combinations the lookup spells out (the heaviest); lighter ones are assumed present.
MAX_QUERY_WORDS = 6


@dataclass(frozen=True)
class QueryWord:
    weight: int                 # its trigrams: its share of the query's word_similarity
    lexemes: tuple[str, ...]    # the english lexemes of the label words similar to it


def query_words(conn: psycopg.Connection, query: str) -> tuple[float, list[QueryWord]]:
    """The trigrams a label must share with `query` (pg_trgm's word_similarity threshold times the query's
    trigrams), and each distinct word of the query with the lexemes of the label words similar to it
    (word_similarity at the same threshold, through label_words' trigram index)."""
    rows = conn.execute(
        "WITH q AS (SELECT DISTINCT w FROM label_words_of(%(q)s) w)"
        " SELECT cardinality(show_trgm(q.w)), coalesce(array_agg(DISTINCT x.lexeme)"
        "  FILTER (WHERE x.lexeme IS NOT NULL), '{}'),"
        " current_setting('pg_trgm.word_similarity_threshold')::real * cardinality(show_trgm(%(q)s))"
        " FROM q LEFT JOIN LATERAL (SELECT unnest(tsvector_to_array(to_tsvector('english', s.word))) AS lexeme"
        "  FROM (SELECT lw.word FROM label_words lw WHERE lw.word %%> q.w"
        "   ORDER BY lw.word <->> q.w, lw.word LIMIT %(k)s) s) x ON true"
        " GROUP BY q.w", {"q": query, "k": WORD_EXPANSIONS}).fetchall()
    return (rows[0][2] if rows else 0.0), [QueryWord(r[0], tuple(r[1])) for r in rows]


def word_tsquery(need: float, words: list[QueryWord]) -> str | None:
    """A tsquery for the labels that can reach word_similarity's threshold: those holding, for a set of query
    words carrying at least `need` trigrams, a word similar to each. It is the OR of every minimal such set (the
    AND of each word's lexemes), over the MAX_QUERY_WORDS heaviest words; the lighter ones count as present.
    A word with no similar label word (a stop word, or nothing close) can carry nothing. None: no label can."""
    found = sorted((w for w in words if w.lexemes), key=lambda w: -w.weight)
    top, rest = found[:MAX_QUERY_WORDS], found[MAX_QUERY_WORDS:]
    need -= sum(w.weight for w in rest)
    minimal: list[tuple[int, ...]] = []
    for size in range(1, len(top) + 1):
        for combo in itertools.combinations(range(len(top)), size):
            if (sum(top[i].weight for i in combo) >= need
                    and not any(set(m) <= set(combo) for m in minimal)):
                minimal.append(combo)
    if not minimal:
        return None
    groups = ["(" + " | ".join(_lexeme(x) for x in w.lexemes) + ")" for w in top]
    return " | ".join("(" + " & ".join(groups[i] for i in combo) + ")" for combo in minimal)


def _lexeme(text: str) -> str:
    """A quoted tsquery operand (quotes and backslashes doubled), taken as it is, not normalised again."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def trigram_arm(conn: psycopg.Connection, query: str, flt: Filters, n: int = TOP_N, pool: int = TRIGRAM_POOL,
                timeout_ms: int = TRIGRAM_TIMEOUT_MS) -> Ranked:
    """Explanation ids whose label contains a stretch similar to `query` (`<%`, word_similarity at pg_trgm's
    threshold, 0.6 by default), so substrings and typos match: "golden gat" finds "Golden Gate Bridge".

    Candidates come from the full-text index: the labels holding words similar to enough of the query's words
    (`word_tsquery`), so the cost follows how many labels hold such words, not the catalog's size. Words the
    full-text parser keeps whole with their punctuation (file names, URLs, decimals) are left to that arm."""
    need, words = query_words(conn, query)
    tsquery = word_tsquery(need, words)
    if tsquery is None:
        return []
    where, params = flt.where()
    # The pool bounds the labels read, not those kept: a stem shared by common words ("mappings" -> 'map') can
    # match thousands of labels of which few are similar enough.
    stmt = sql.SQL(
        "SELECT c.id, c.r FROM (SELECT e.id, word_similarity(%(q)s, e.label) AS r FROM explanations e"
        " WHERE e.label_tsv @@ %(tsq)s::tsquery AND {where} LIMIT %(pool)s) c"
        " WHERE c.r >= current_setting('pg_trgm.word_similarity_threshold')::real"
        " ORDER BY c.r DESC, c.id LIMIT %(n)s"
    ).format(where=where)
    # a bound on a pathological lookup (a query of many short words, each a prefix of common ones)
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{timeout_ms}ms",))
            return [(r[0], r[1]) for r in conn.execute(
                stmt, {**params, "q": query, "tsq": tsquery, "pool": pool, "n": n})]
    except psycopg.errors.QueryCanceled:
        raise ArmTimeout(f"the trigram arm took over {timeout_ms} ms and was dropped") from None


def filter_ranked(conn: psycopg.Connection, ranked: Ranked, flt: Filters, n: int = TOP_N) -> Ranked:
    """The semantic arm's SQL half: of the nearest neighbours (best first), those that pass the filters and still
    exist, in the same order, at most n."""
    if not ranked:
        return []
    where, params = flt.where()
    stmt = sql.SQL("SELECT e.id FROM explanations e JOIN unnest(%(ids)s::bigint[]) WITH ORDINALITY k(id, pos)"
                   " ON e.id = k.id WHERE {where} ORDER BY k.pos LIMIT %(n)s").format(where=where)
    keep = {r[0] for r in conn.execute(stmt, {**params, "ids": [i for i, _ in ranked], "n": n})}
    return [(i, s) for i, s in ranked if i in keep]


# ---------------------------------------------------------------- label embeddings (source of truth)
def catalog_uuid(conn: psycopg.Connection) -> str:
    return str(conn.execute("SELECT uuid FROM search_catalog").fetchone()[0])


def unembedded_labels(conn: psycopg.Connection, limit: int) -> list[tuple[int, str]]:
    """(explanation id, label) of labels that have no embedding yet, oldest first."""
    return conn.execute("SELECT id, label FROM explanations WHERE label IS NOT NULL AND NOT embedded"
                        " ORDER BY id LIMIT %s", (limit,)).fetchall()


def store_embeddings(conn: psycopg.Connection, ids: list[int], vecs: np.ndarray, model: str) -> None:
    """Idempotent: COPY into a staging table, then insert the ids not stored yet (COPY has no ON CONFLICT)."""
    v16 = np.ascontiguousarray(vecs, dtype="<f2")
    with conn.transaction():
        # one writer at a time, so seq order is commit order and an index caught up to seq S misses nothing below
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('label_embeddings'))")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS stage_emb (explanation_id bigint, vec bytea) ON COMMIT DROP")
        with conn.cursor().copy("COPY stage_emb FROM STDIN") as cp:
            for i, v in zip(ids, v16):
                cp.write_row((int(i), v.tobytes()))
        conn.execute("INSERT INTO label_embeddings (explanation_id, model, dim, vec) SELECT s.explanation_id, %s, %s,"
                     " s.vec FROM stage_emb s JOIN explanations e ON e.id = s.explanation_id ORDER BY 1"
                     " ON CONFLICT (explanation_id) DO NOTHING", (model, v16.shape[1]))
        conn.execute("UPDATE explanations e SET embedded = true FROM stage_emb s WHERE e.id = s.explanation_id")


def last_seq(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(max(seq), 0) FROM label_embeddings").fetchone()[0]


def embeddings_since(conn: psycopg.Connection, seq: int, batch: int = 50_000):
    """Yields (ids, float16 vectors [n, dim], last seq) for the embeddings stored after `seq`, a batch at a
    time from a server-side cursor, so a rebuild over millions of labels holds one batch in memory."""
    with conn.transaction(), conn.cursor(name="emb_since") as cur:
        cur.itersize = batch
        cur.execute("SELECT explanation_id, seq, dim, vec FROM label_embeddings WHERE seq > %s ORDER BY seq", (seq,))
        while rows := cur.fetchmany(batch):
            dim = rows[0][2]
            vecs = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f2").reshape(len(rows), dim)
            yield np.array([r[0] for r in rows], dtype=np.uint64), vecs, rows[-1][1]


# ---------------------------------------------------------------- what a result shows
class LabelHit(BaseModel):
    id: int
    sae: str
    index: int
    label: str
    explainer: str
    density: float | None
    scores: dict[str, float]


def label_hits(conn: psycopg.Connection, ids: list[int]) -> list[LabelHit]:
    """The rows behind explanation ids, with each scorer's value (the best over simulators), in no order."""
    if not ids:
        return []
    rows = conn.execute(
        "SELECT e.id, s.name, e.feature, e.label, e.explainer, f.density,"
        " coalesce((SELECT json_object_agg(x.scorer, x.v) FROM (SELECT sc.scorer, max(sc.value) AS v FROM scores sc"
        "  WHERE sc.explanation_id = e.id AND sc.value IS NOT NULL GROUP BY sc.scorer) x), '{}')"
        " FROM explanations e JOIN saes s ON s.id = e.sae_id"
        " LEFT JOIN features f ON f.sae_id = e.sae_id AND f.idx = e.feature WHERE e.id = ANY(%s)",
        (ids,)).fetchall()
    return [LabelHit(id=r[0], sae=r[1], index=r[2], label=r[3], explainer=r[4], density=r[5], scores=r[6])
            for r in rows]
