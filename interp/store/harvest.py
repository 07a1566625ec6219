"""Writing a harvest into the catalog: one transaction swaps the SAE's row and binary-COPYs its features,
contexts and examples straight into their tables, a chunk of features at a time (so memory stays that of the
harvest state plus one chunk). With --replace and the same weights (weights_sha) the SAE row and its labels stay
and only features, contexts and examples are swapped; other weights drop the old row and, by cascade, its labels.
Readers therefore see the previous complete state or the new one, never a mix, and a process killed before that
commit leaves nothing behind.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from interp import pgbinary
from interp.db import analyze_partitions
from interp.pgbinary import Col
from sae.harvest import KINDS, SPLITS, HarvestResult

from .saes import SAEMeta, name_taken, sae_id


def _text(codes: np.ndarray, names: tuple[str, ...]) -> Col:
    enc = [n.encode() for n in names]
    table = np.frombuffer(b"".join(enc), np.uint8)
    sizes = np.array([len(e) for e in enc])
    lens = sizes[codes]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[codes]
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
    return Col("bytes", table[idx], lens)


def example_groups(res: HarvestResult) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of examples sharing (feature, kind, split): one examples row each."""
    ex = res.examples
    code = ex.feature.astype(np.int64) * 8 + ex.kind * 2 + ex.split
    cuts = np.flatnonzero(np.diff(code)) + 1
    return np.concatenate([[0], cuts]).astype(np.int64), np.concatenate([cuts, [len(ex)]]).astype(np.int64)


def example_blocks(res: HarvestResult, sid: int, block: int = 16384):
    """Binary COPY data for the examples table, `block` rows at a time: one row per (feature, kind, split),
    the examples of that group packed into arrays."""
    ex = res.examples
    if len(ex) == 0:
        return
    starts, ends = example_groups(res)
    for g0 in range(0, len(starts), block):
        gs, ge = starts[g0:g0 + block], ends[g0:g0 + block]
        a, b = int(gs[0]), int(ge[-1])
        n = ge - gs
        kind = ex.kind[gs].astype(np.int64)
        quant = ex.kind[a:b] == 1
        cols = [Col(">i4", np.full(len(gs), sid)), Col(">i4", ex.feature[gs]), _text(kind, KINDS), _text(ex.split[gs].astype(np.int64), SPLITS),
                Col(">i2", np.full(len(gs), res.width)), Col(">i4", ex.ctx[a:b], n), Col(">i2", ex.start[a:b], n),
                Col(">i2", ex.max_pos[a:b], n), Col(">i2", ex.qbin[a:b][quant], np.where(kind == 1, n, -1)),
                Col(">f4", ex.scale[a:b], n), Col("bytes", ex.acts[a:b].ravel(), n * res.width)]
        yield pgbinary.rows(cols, len(gs))


def feature_blocks(res: HarvestResult, sid: int, block: int = 262144):
    lg = res.logits
    nb = res.hist.shape[1]
    for a in range(0, res.n_features, block):
        b = min(a + block, res.n_features)
        m = b - a
        cols = [Col(">i4", np.full(m, sid)), Col(">i4", np.arange(a, b) + res.offset), Col(">f4", res.density[a:b]),
                Col(">i8", res.n_fired[a:b]), Col(">f4", res.max_act[a:b]), Col(">f4", res.mean_act[a:b]),
                Col(">i4", res.hist[a:b].ravel(), np.full(m, nb)), Col(">f4", res.hist_max[a:b])]
        if lg is not None:
            n = np.full(m, lg.top_ids.shape[1])
            cols += [Col(">i4", lg.top_ids[a:b].ravel(), n), Col(">f4", lg.top_vals[a:b].ravel(), n),
                     Col(">i4", lg.bottom_ids[a:b].ravel(), n), Col(">f4", lg.bottom_vals[a:b].ravel(), n)]
        else:
            cols += [Col(">i4", np.zeros(0), np.full(m, -1))] * 4
        yield pgbinary.rows(cols, m)


def context_blocks(res: HarvestResult, sid: int, block: int = 65536, skip: set[int] = frozenset()):
    ids = sorted(set(res.contexts) - skip)
    for a in range(0, len(ids), block):
        part = ids[a:a + block]
        toks = [res.contexts[c] for c in part]
        yield pgbinary.rows([Col(">i4", np.full(len(part), sid)), Col(">i4", np.array(part)),
                             Col(">i4", np.concatenate(toks), np.array([len(t) for t in toks]))], len(part))


def _copy(cur, table: str, blocks) -> None:
    with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(pgbinary.HEADER)
        for data in blocks:
            cp.write(data)
        cp.write(pgbinary.TRAILER)


def _swap_in(conn: psycopg.Connection, name: str, meta: SAEMeta, tokenizer: str | None, info: dict,
             replace: bool) -> tuple[int, int]:
    """Inside the write's transaction: the SAE's row, kept (same weights: its labels still describe these
    features) or made anew (other weights: their labels cascade away). Returns (sae id, labels kept)."""
    row = (meta.model, meta.layer, meta.site, meta.d_in, meta.n_features, meta.arch, meta.k, tokenizer,
           Jsonb(meta.metrics), Jsonb(info), meta.path, meta.weights_sha)
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("sae:" + name,))
    old = conn.execute("SELECT id, weights_sha FROM saes WHERE name = %s", (name,)).fetchone()
    if old is not None and not replace:
        raise name_taken(name)
    if old is not None and meta.weights_sha is not None and old[1] == meta.weights_sha:
        sid = old[0]
        conn.execute("UPDATE saes SET model = %s, layer = %s, site = %s, d_in = %s, n_features = %s, arch = %s,"
                     " k = %s, tokenizer = %s, metrics = %s, harvest = %s, path = %s, weights_sha = %s"
                     " WHERE id = %s", (*row, sid))
        for table in ("features", "contexts", "examples"):
            conn.execute(f"DELETE FROM {table} WHERE sae_id = %s", (sid,))
        return sid, conn.execute("SELECT count(*) FROM explanations WHERE sae_id = %s", (sid,)).fetchone()[0]
    if old is not None:
        conn.execute("DELETE FROM saes WHERE id = %s", (old[0],))
    sid = conn.execute(
        "INSERT INTO saes (name, model, layer, site, d_in, n_features, arch, k, tokenizer, metrics, harvest,"
        " path, weights_sha) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (name, *row)).fetchone()[0]
    return sid, 0


def write_harvest(conn: psycopg.Connection, name: str, meta: SAEMeta,
                  res: HarvestResult | Iterable[HarvestResult], *, tokenizer: str | None = None,
                  harvest_info: dict | None = None, replace: bool = False) -> dict:
    """Loads a harvest and makes it visible atomically; returns row counts. `res` is a HarvestResult or
    consecutive chunks of one (HarvestState.result_chunks): each chunk is copied and dropped before the next
    is made, so only one chunk's result is ever in memory.

    The rows are copied straight into the catalog's tables inside the one transaction that also swaps the
    SAE's row: readers see the old rows until it commits (MVCC), and an abort or a killed process leaves
    nothing. Copying into staging first and moving the rows afterwards wrote every row twice."""
    if sae_id(conn, name) is not None and not replace:
        raise name_taken(name)
    chunks = [res] if isinstance(res, HarvestResult) else res
    n = {"features": 0, "examples": 0, "example_rows": 0, "contexts": 0}
    seen: set[int] = set()   # contexts already copied: chunks share contexts, a context is stored once
    with conn.transaction():
        sid, kept = _swap_in(conn, name, meta, tokenizer, harvest_info or {}, replace)
        cur = conn.cursor()
        for part in chunks:
            _copy(cur, "features", feature_blocks(part, sid))
            _copy(cur, "contexts", context_blocks(part, sid, skip=seen))
            _copy(cur, "examples", example_blocks(part, sid))
            seen.update(part.contexts)
            n["features"] += part.n_features
            n["examples"] += len(part.examples)
            n["example_rows"] += len(example_groups(part)[0]) if len(part.examples) else 0
            del part   # the generator makes the next chunk while this reference would still hold the last
        n["contexts"] = len(seen)
    # planner statistics now rather than at autovacuum's next visit: reads that join a partition the planner
    # believes empty scan it whole
    analyze_partitions(conn, sid, ("features", "contexts", "examples"))
    return {"sae_id": sid, **n, "labels_kept": kept}
