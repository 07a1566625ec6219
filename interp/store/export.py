"""Reading a whole SAE's scored catalog out, streamed: either finished JSON lines by COPY TO STDOUT (jsonl and
parquet), or records from a server-side (named) cursor that hands the rows over `itersize` at a time (csv,
neuronpedia, and anything with examples), so the exporter's memory is one batch whatever the SAE's size.
Postgres builds each feature's explanations (with their scores) as JSON in the same query, through the unique
indexes on explanations (sae_id, feature, ...) and scores (explanation_id, ...).

Only the fields listed in the records leave: never a failure text, a score's per-example details, the SAE's
path or harvest settings, which may hold what a user would not publish.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from .search import Filters
from .vocab import decode_ids

BATCH = 2048


@dataclass(slots=True)
class ExportScore:
    scorer: str
    simulator: str
    value: float
    method: str | None


@dataclass(slots=True)
class ExportExplanation:
    label: str
    explainer: str
    prompt_version: str
    is_baseline: bool
    scores: list[ExportScore]


@dataclass(slots=True)
class ExportExample:
    tokens: list[str]
    acts: list[float]


@dataclass(slots=True)
class ExportFeature:
    sae: str
    index: int
    density: float
    max_act: float
    mean_act: float
    explanations: list[ExportExplanation]
    examples: list[ExportExample] | None = None
    hist: list[int] = field(default_factory=list)
    hist_max: float = 0.0
    top_logits: list[int] | None = None
    top_logit_vals: list[float] | None = None
    bottom_logits: list[int] | None = None
    bottom_logit_vals: list[float] | None = None


def _parts(flt: Filters) -> tuple[sql.Composable, sql.Composable, dict]:
    """The explanations of feature `f` as a JSON list (label fields and their scores), and the condition on
    features. With a score filter only the features that have a qualifying label are kept, with only those
    labels; a scorer filter also narrows each label's scores to that scorer."""
    where, params = flt.where("e")
    score_cond = sql.SQL("s.explanation_id = e.id AND s.value IS NOT NULL")
    if flt.scorer is not None:
        score_cond = sql.SQL("{} AND s.scorer = %(f_scorer)s").format(score_cond)
    expl = sql.SQL(
        "(SELECT coalesce(json_agg(json_build_object('label', e.label, 'explainer', e.explainer,"
        " 'prompt_version', e.prompt_version, 'is_baseline', e.is_baseline, 'scores',"
        " (SELECT coalesce(json_agg(json_build_object('scorer', s.scorer, 'simulator', s.simulator,"
        " 'value', s.value, 'method', s.method) ORDER BY s.scorer, s.simulator), '[]') FROM scores s WHERE {sc}))"
        " ORDER BY e.id), '[]') FROM explanations e WHERE e.sae_id = f.sae_id AND e.feature = f.idx AND {where})"
    ).format(sc=score_cond, where=where)
    cond = sql.SQL("f.sae_id = %(sid)s")
    if flt.scorer is not None or flt.min_score is not None:
        cond = sql.SQL("{} AND EXISTS (SELECT 1 FROM explanations e WHERE e.sae_id = f.sae_id AND e.feature = f.idx"
                       " AND {where})").format(cond, where=where)
    return expl, cond, params


def _explanations(items: list[dict]) -> list[ExportExplanation]:
    return [ExportExplanation(label=x["label"], explainer=x["explainer"], prompt_version=x["prompt_version"],
                              is_baseline=x["is_baseline"],
                              scores=[ExportScore(s["scorer"], s["simulator"], s["value"], s["method"])
                                      for s in x["scores"]]) for x in items]


def stream_features(conn: psycopg.Connection, sae: str, sid: int, flt: Filters,
                    with_examples: bool = False, batch: int = BATCH) -> Iterator[list[ExportFeature]]:
    """The SAE's features in index order, `batch` at a time."""
    expl, cond, params = _parts(flt)
    stmt = sql.SQL("SELECT f.idx, f.density, f.max_act, f.mean_act, f.hist, f.hist_max, f.top_logits,"
                   " f.top_logit_vals, f.bottom_logits, f.bottom_logit_vals, {expl} FROM features f"
                   " WHERE {cond} ORDER BY f.idx").format(expl=expl, cond=cond)
    with conn.transaction(), conn.cursor(name="export_features") as cur:
        cur.itersize = batch
        cur.execute(stmt, {**params, "sid": sid})
        while rows := cur.fetchmany(batch):
            feats = [ExportFeature(sae=sae, index=r[0], density=r[1], max_act=r[2], mean_act=r[3], hist=r[4],
                                   hist_max=r[5], top_logits=r[6], top_logit_vals=r[7], bottom_logits=r[8],
                                   bottom_logit_vals=r[9], explanations=_explanations(r[10])) for r in rows]
            if with_examples:
                ex = top_examples(conn, sid, [f.index for f in feats])
                for f in feats:
                    f.examples = ex.get(f.index, [])
            yield feats


def feature_json_lines(conn: psycopg.Connection, sae: str, sid: int, flt: Filters) -> Iterator[bytes]:
    """The jsonl export's lines (one feature each, in index order: sae, index, density, max_act, mean_act,
    explanations), built by Postgres and streamed by COPY TO STDOUT, so Python only moves bytes. CSV format
    with a delimiter and a quote byte that JSON text never holds (Postgres escapes control characters in JSON)
    passes each line through unchanged, where the text format would double every backslash."""
    expl, cond, params = _parts(flt)
    stmt = sql.SQL(
        "COPY (SELECT json_build_object('sae', %(sae)s::text, 'index', f.idx, 'density', f.density, 'max_act',"
        " f.max_act, 'mean_act', f.mean_act, 'explanations', {expl}) FROM features f WHERE {cond} ORDER BY f.idx)"
        " TO STDOUT (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')").format(expl=expl, cond=cond)
    with conn.cursor().copy(stmt, {**params, "sae": sae, "sid": sid}) as cp:
        yield from cp


def count_labels(conn: psycopg.Connection, sid: int, flt: Filters) -> int:
    """How many labels an export with these filters holds."""
    where, params = flt.where("e")
    return conn.execute(sql.SQL("SELECT count(*) FROM explanations e WHERE e.sae_id = %(sid)s AND {}").format(where),
                        {**params, "sid": sid}).fetchone()[0]


def top_examples(conn: psycopg.Connection, sid: int, idxs: list[int]) -> dict[int, list[ExportExample]]:
    """The top-activating snippets of many features at once (both splits), tokens decoded: three queries for
    a batch instead of load_feature_examples' four per feature."""
    rows = conn.execute("SELECT feature, width, ctx, start, scale, acts FROM examples WHERE sae_id = %s"
                        " AND feature = ANY(%s) AND kind = 'top' ORDER BY feature, split", (sid, idxs)).fetchall()
    ctx_ids = sorted({c for r in rows for c in r[2]})
    contexts = dict(conn.execute("SELECT ctx, token_ids FROM contexts WHERE sae_id = %s AND ctx = ANY(%s)",
                                 (sid, ctx_ids)).fetchall())
    out: dict[int, list[tuple[list[int], list[float]]]] = {}
    for feat, width, ctxs, starts, scales, acts in rows:
        q = np.frombuffer(acts, dtype=np.uint8).reshape(len(ctxs), width)
        for i, (c, s, sc) in enumerate(zip(ctxs, starts, scales)):
            out.setdefault(feat, []).append((contexts[c][s:s + width], (q[i] / 255.0 * sc).tolist()))
    tok_key = conn.execute("SELECT tokenizer FROM saes WHERE id = %s", (sid,)).fetchone()[0]
    vocab = decode_ids(conn, tok_key, {t for exs in out.values() for ids, _ in exs for t in ids})
    return {f: [ExportExample(tokens=[vocab.get(t, f"<{t}>") for t in ids], acts=a) for ids, a in exs]
            for f, exs in out.items()}


def scorers_of(conn: psycopg.Connection, sid: int) -> list[str]:
    """The scorers with a value on some label of the SAE (the CSV's score columns)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT s.scorer FROM scores s JOIN explanations e ON e.id = s.explanation_id"
        " WHERE e.sae_id = %s AND s.value IS NOT NULL ORDER BY 1", (sid,))]


def decode_tokens(conn: psycopg.Connection, sid: int, ids: set[int]) -> dict[int, str]:
    tok_key = conn.execute("SELECT tokenizer FROM saes WHERE id = %s", (sid,)).fetchone()[0]
    return decode_ids(conn, tok_key, ids)


@dataclass
class SAEInfo:
    model: str
    layer: int
    site: str


def sae_info(conn: psycopg.Connection, sid: int) -> SAEInfo:
    return SAEInfo(*conn.execute("SELECT model, layer, site FROM saes WHERE id = %s", (sid,)).fetchone())
