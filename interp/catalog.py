"""The catalog in Postgres: write a harvest (COPY into staging, one swap transaction) and read features back.

A harvest is bulk-loaded with binary COPY into session-temporary staging tables (a chunk of features at a
time, so memory stays that of the harvest state plus one chunk), then one transaction swaps the SAE's rows
in. With --replace and the same weights (weights_sha) the SAE row and its labels stay and only features,
contexts and examples are swapped; other weights drop the old row and, by cascade, its labels. Readers therefore
see the previous complete state or the new one, never a mix, and a process killed before that commit leaves
nothing behind (its temp tables die with its session).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import psycopg
import torch
from psycopg.types.json import Jsonb

from interp import pgbinary
from interp.pgbinary import Col
from sae.errors import InputError
from sae.harvest import KINDS, SPLITS, HarvestResult
from sae.records import Example, FeatureExamples


@dataclass
class SAEMeta:
    """What the saes row records about an SAE."""
    model: str
    layer: int
    site: str
    d_in: int
    n_features: int
    arch: str
    k: int | None = None
    path: str | None = None
    metrics: dict = field(default_factory=dict)
    weights_sha: str | None = None


def weights_sha(sae) -> str:
    """sha256 over the loaded module's tensors and the settings that change which latents fire (arch, k):
    loaders normalise names and dtypes, so the same SAE hashes alike whichever format it was read from."""
    h = hashlib.sha256(f"{sae.cfg.arch}:{sae.cfg.k};".encode())
    for key, t in sorted(sae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _name_taken(name: str) -> InputError:
    return InputError(f"an SAE named {name!r} exists already; pass --replace to re-harvest it")


def sae_id(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM saes WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


def require_sae(conn: psycopg.Connection, name: str) -> int:
    sid = sae_id(conn, name)
    if sid is None:
        names = [r[0] for r in conn.execute("SELECT name FROM saes ORDER BY name LIMIT 20")]
        raise InputError(f"no SAE named {name!r} in the catalog; known: {', '.join(names) or 'none (run interp harvest)'}")
    return sid


# ---------------------------------------------------------------- vocabulary
def vocab_key(model: str, tokens: list[str]) -> str:
    digest = hashlib.sha1("\x1f".join(tokens).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{model}:{digest}"


def tokenizer_vocab(tokenizer) -> list[str]:
    """Every token id decoded on its own, as a snippet shows it."""
    n = len(tokenizer)
    toks = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    return [t.replace("\x00", "\\x00") for t in toks]


def store_vocab(conn: psycopg.Connection, key: str, tokens: list[str]) -> None:
    """Idempotent: a tokenizer's vocabulary is stored once, shared by every SAE on that model."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM vocab WHERE tokenizer = %s LIMIT 1", (key,)).fetchone():
            return
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("vocab:" + key,))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS stage_vocab (token_id int, token text) ON COMMIT DROP")
        with conn.cursor().copy("COPY stage_vocab FROM STDIN") as cp:
            for i, t in enumerate(tokens):
                cp.write_row((i, t))
        conn.execute("INSERT INTO vocab SELECT %s, token_id, token FROM stage_vocab ON CONFLICT DO NOTHING", (key,))


def decode_ids(conn: psycopg.Connection, key: str | None, ids: set[int]) -> dict[int, str]:
    if not key or not ids:
        return {}
    rows = conn.execute("SELECT token_id, token FROM vocab WHERE tokenizer = %s AND token_id = ANY(%s)",
                        (key, sorted(ids)))
    return dict(rows.fetchall())


# ---------------------------------------------------------------- writing a harvest
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_features (idx int, density real, n_fired bigint, max_act real,
    mean_act real, hist int4[], hist_max real, top_logits int4[], top_logit_vals real[], bottom_logits int4[],
    bottom_logit_vals real[]);
CREATE TEMP TABLE IF NOT EXISTS stage_contexts (ctx int, token_ids int4[]);
CREATE TEMP TABLE IF NOT EXISTS stage_examples (feature int, kind text, split text, width int2, ctx int4[],
    start int2[], max_pos int2[], quantile_bin int2[], scale real[], acts bytea);
TRUNCATE stage_features, stage_contexts, stage_examples;
"""

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


def example_blocks(res: HarvestResult, block: int = 65536):
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
        cols = [Col(">i4", ex.feature[gs]), _text(kind, KINDS), _text(ex.split[gs].astype(np.int64), SPLITS),
                Col(">i2", np.full(len(gs), res.width)), Col(">i4", ex.ctx[a:b], n), Col(">i2", ex.start[a:b], n),
                Col(">i2", ex.max_pos[a:b], n), Col(">i2", ex.qbin[a:b][quant], np.where(kind == 1, n, -1)),
                Col(">f4", ex.scale[a:b], n), Col("bytes", ex.acts[a:b].ravel(), n * res.width)]
        yield pgbinary.rows(cols, len(gs))


def feature_blocks(res: HarvestResult, block: int = 262144):
    lg = res.logits
    nb = res.hist.shape[1]
    for a in range(0, res.n_features, block):
        b = min(a + block, res.n_features)
        m = b - a
        cols = [Col(">i4", np.arange(a, b) + res.offset), Col(">f4", res.density[a:b]),
                Col(">i8", res.n_fired[a:b]), Col(">f4", res.max_act[a:b]), Col(">f4", res.mean_act[a:b]),
                Col(">i4", res.hist[a:b].ravel(), np.full(m, nb)), Col(">f4", res.hist_max[a:b])]
        if lg is not None:
            n = np.full(m, lg.top_ids.shape[1])
            cols += [Col(">i4", lg.top_ids[a:b].ravel(), n), Col(">f4", lg.top_vals[a:b].ravel(), n),
                     Col(">i4", lg.bottom_ids[a:b].ravel(), n), Col(">f4", lg.bottom_vals[a:b].ravel(), n)]
        else:
            cols += [Col(">i4", np.zeros(0), np.full(m, -1))] * 4
        yield pgbinary.rows(cols, m)


def context_blocks(res: HarvestResult, block: int = 65536, skip: set[int] = frozenset()):
    ids = sorted(set(res.contexts) - skip)
    for a in range(0, len(ids), block):
        part = ids[a:a + block]
        toks = [res.contexts[c] for c in part]
        yield pgbinary.rows([Col(">i4", np.array(part)),
                             Col(">i4", np.concatenate(toks), np.array([len(t) for t in toks]))], len(part))


def _copy(cur, table: str, blocks) -> None:
    with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(pgbinary.HEADER)
        for data in blocks:
            cp.write(data)
        cp.write(pgbinary.TRAILER)


def write_harvest(conn: psycopg.Connection, name: str, meta: SAEMeta,
                  res: HarvestResult | Iterable[HarvestResult], *, tokenizer: str | None = None,
                  harvest_info: dict | None = None, replace: bool = False) -> dict:
    """Loads a harvest and makes it visible atomically; returns row counts. `res` is a HarvestResult or
    consecutive chunks of one (HarvestState.result_chunks): each chunk is copied into staging and dropped
    before the next is made, so only one chunk's result is ever in memory."""
    if sae_id(conn, name) is not None and not replace:
        raise _name_taken(name)
    chunks = [res] if isinstance(res, HarvestResult) else res
    n = {"features": 0, "examples": 0, "example_rows": 0, "contexts": 0}
    seen: set[int] = set()   # contexts already staged: chunks share contexts, a context is stored once
    with conn.transaction():
        conn.execute(_STAGING)
        cur = conn.cursor()
        for part in chunks:
            _copy(cur, "stage_features", feature_blocks(part))
            _copy(cur, "stage_contexts", context_blocks(part, skip=seen))
            _copy(cur, "stage_examples", example_blocks(part))
            seen.update(part.contexts)
            n["features"] += part.n_features
            n["examples"] += len(part.examples)
            n["example_rows"] += len(example_groups(part)[0]) if len(part.examples) else 0
            del part   # the generator makes the next chunk while this reference would still hold the last
        n["contexts"] = len(seen)
    row = (meta.model, meta.layer, meta.site, meta.d_in, meta.n_features, meta.arch, meta.k, tokenizer,
           Jsonb(meta.metrics), Jsonb(harvest_info or {}), meta.path, meta.weights_sha)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("sae:" + name,))
        old = conn.execute("SELECT id, weights_sha FROM saes WHERE name = %s", (name,)).fetchone()
        if old is not None and not replace:
            raise _name_taken(name)
        if old is not None and meta.weights_sha is not None and old[1] == meta.weights_sha:
            # the same weights: labels (and jobs) still describe these features, so the row and they stay
            sid = old[0]
            conn.execute("UPDATE saes SET model = %s, layer = %s, site = %s, d_in = %s, n_features = %s, arch = %s,"
                         " k = %s, tokenizer = %s, metrics = %s, harvest = %s, path = %s, weights_sha = %s"
                         " WHERE id = %s", (*row, sid))
            for table in ("features", "contexts", "examples"):
                conn.execute(f"DELETE FROM {table} WHERE sae_id = %s", (sid,))
            kept = conn.execute("SELECT count(*) FROM explanations WHERE sae_id = %s", (sid,)).fetchone()[0]
        else:
            if old is not None:  # other weights: their labels describe other features and cascade away
                conn.execute("DELETE FROM saes WHERE id = %s", (old[0],))
            sid = conn.execute(
                "INSERT INTO saes (name, model, layer, site, d_in, n_features, arch, k, tokenizer, metrics, harvest,"
                " path, weights_sha) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (name, *row)).fetchone()[0]
            kept = 0
        conn.execute("INSERT INTO features SELECT %s, * FROM stage_features", (sid,))
        conn.execute("INSERT INTO contexts SELECT %s, * FROM stage_contexts", (sid,))
        conn.execute("INSERT INTO examples SELECT %s, * FROM stage_examples", (sid,))
        conn.execute("TRUNCATE stage_features, stage_contexts, stage_examples")
    return {"sae_id": sid, **n, "labels_kept": kept}


# ---------------------------------------------------------------- reading
def load_feature_examples(conn: psycopg.Connection, sae_name: str, index: int,
                          split: str | None = None) -> FeatureExamples:
    """One feature's examples as records, tokens decoded through the stored vocabulary."""
    sid = require_sae(conn, sae_name)
    feat = conn.execute("SELECT max_act, density FROM features WHERE sae_id = %s AND idx = %s", (sid, index)).fetchone()
    if feat is None:
        n = conn.execute("SELECT n_features FROM saes WHERE id = %s", (sid,)).fetchone()[0]
        raise InputError(f"SAE {sae_name!r} has no feature {index}; valid: 0..{n - 1}")
    rows = conn.execute(
        "SELECT kind, split, width, ctx, start, max_pos, quantile_bin, scale, acts FROM examples"
        " WHERE sae_id = %s AND feature = %s AND (%s::text IS NULL OR split = %s)"
        " ORDER BY array_position(ARRAY['top', 'quantile', 'random'], kind), split",
        (sid, index, split, split)).fetchall()
    ctx_ids = sorted({c for r in rows for c in r[3]})
    contexts = dict(conn.execute("SELECT ctx, token_ids FROM contexts WHERE sae_id = %s AND ctx = ANY(%s)",
                                 (sid, ctx_ids)).fetchall())
    out: list[Example] = []
    for kind, sp, width, ctxs, starts, _max_pos, qbins, scales, acts in rows:
        q = np.frombuffer(acts, dtype=np.uint8).reshape(len(ctxs), width)
        for i, (c, s, sc) in enumerate(zip(ctxs, starts, scales)):
            out.append(Example(token_ids=contexts[c][s:s + width], acts=(q[i] / 255.0 * sc).tolist(), kind=kind,
                               split=sp, quantile_bin=qbins[i] if qbins else None))
    tok_key = conn.execute("SELECT tokenizer FROM saes WHERE id = %s", (sid,)).fetchone()[0]
    vocab = decode_ids(conn, tok_key, {t for e in out for t in e.token_ids})
    if vocab:
        for e in out:
            e.tokens = [vocab.get(t, f"<{t}>") for t in e.token_ids]
    return FeatureExamples(sae=sae_name, index=index, examples=out, max_act=float(feat[0]), density=float(feat[1]))


@dataclass
class FeatureView:
    """Everything `interp feature` shows."""
    sae: str
    index: int
    density: float
    n_fired: int
    max_act: float
    mean_act: float
    hist: list[int]
    hist_max: float
    top_logits: list[str] | None
    bottom_logits: list[str] | None
    examples: FeatureExamples
    labels: list[dict]


def feature_view(conn: psycopg.Connection, sae_name: str, index: int) -> FeatureView:
    ex = load_feature_examples(conn, sae_name, index)
    sid = sae_id(conn, sae_name)
    d, nf, mx, mean, hist, hmax, tl, bl, tok = conn.execute(
        "SELECT f.density, f.n_fired, f.max_act, f.mean_act, f.hist, f.hist_max, f.top_logits, f.bottom_logits,"
        " s.tokenizer FROM features f JOIN saes s ON s.id = f.sae_id WHERE f.sae_id = %s AND f.idx = %s",
        (sid, index)).fetchone()
    vocab = decode_ids(conn, tok, set(tl or []) | set(bl or []))
    labels = []
    for eid, explainer, pv, label, base, fail in conn.execute(
            "SELECT id, explainer, prompt_version, label, is_baseline, failure FROM explanations"
            " WHERE sae_id = %s AND feature = %s ORDER BY id", (sid, index)):
        scores = [dict(scorer=s, simulator=m, value=v, method=me) for s, m, v, me in conn.execute(
            "SELECT scorer, simulator, value, method FROM scores WHERE explanation_id = %s ORDER BY scorer", (eid,))]
        labels.append(dict(explainer=explainer, prompt_version=pv, label=label, is_baseline=base, failure=fail,
                           scores=scores))
    names = lambda ids: [vocab.get(t, f"<{t}>") for t in ids] if ids else None
    return FeatureView(sae_name, index, d, nf, mx, mean, list(hist), hmax, names(tl), names(bl), ex, labels)


# ---------------------------------------------------------------- the harvest command
def _shard_file(state_dir, i: int, n: int):
    from pathlib import Path

    return Path(state_dir) / f"shard-{i}-of-{n}.pt"


def harvest_to_catalog(sae_path: str, name: str, corpus: str, tokens: int, *, ctx: int = 32, ctx_len: int = 64,
                       top: int = 50, shard: str | None = None, replace: bool = False, device: str = "auto",
                       batch_size: int = 16, state_dir: str | None = None, progress: bool = True,
                       url: str | None = None) -> dict:
    """Harvests an SAE directory over a corpus into the catalog as NAME; returns the --json summary.

    With --shard i/n the shard's partial state goes to state_dir. Each shard then takes a session advisory
    lock on NAME and looks again: the one that finds all n states merges them (exactly the unsharded result),
    writes the catalog and deletes the states before letting go; a shard that finds its own state gone was
    merged by another, and one that finds states missing waits for their shards."""
    import os
    import time
    from pathlib import Path

    from interp.db import connect, migrate
    from sae.formats import load_sae, read_cfg
    from sae.harvest import HarvestConfig, HarvestState, harvest, logit_tokens, parse_shard
    from sae.models import hooked, is_causal

    t0 = time.perf_counter()
    i, n = parse_shard(shard)
    if ctx < 2 or top < 2:
        raise InputError(f"--ctx and --top must be at least 2, got --ctx {ctx} --top {top}")
    if ctx > ctx_len:
        raise InputError(f"--ctx {ctx} is longer than the harvest contexts (--ctx-len {ctx_len}); give --ctx <= --ctx-len")
    conn = connect(url)  # before the model loads: a missing database fails in a second, naming its URL
    try:  # closing the connection also releases the shards' merge lock, however this ends
        migrate(conn)
        if sae_id(conn, name) is not None and not replace:
            raise _name_taken(name)
        sae = load_sae(sae_path, "cpu").eval()
        sha = weights_sha(sae)
        c = sae.cfg
        if not c.model:
            raise InputError(f"the SAE in {sae_path} does not say which model it reads; its cfg.json needs model/layer/site")
        hm = hooked(c.model, c.layer, c.site, device)
        sae = sae.to(hm.device)
        cfg = HarvestConfig(top_k=top, ctx=ctx)
        state = harvest(hm, sae, corpus, tokens, cfg, ctx_len=ctx_len, batch_size=batch_size, shard=(i, n),
                        progress=progress)
        if n > 1:
            folder = Path(state_dir or f"runs/harvest-{name}")
            folder.mkdir(parents=True, exist_ok=True)
            target = _shard_file(folder, i, n)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            state.save(tmp)
            os.replace(tmp, target)  # a shard file is either complete or absent
            # saved before the lock, checked under it: of shards finishing together exactly one merges
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", ("harvest-merge:" + name,))
            partial = {"features": c.n_latents, "examples": 0, "tokens": state.n_tokens,
                       "seconds": round(time.perf_counter() - t0, 2), "shard": f"{i}/{n}"}
            if not target.exists():
                return {**partial, "merged_by": "another shard"}
            missing = [j for j in range(n) if not _shard_file(folder, j, n).exists()]
            if missing:
                return {**partial, "waiting_for": missing}
            for j in range(n):
                if j != i:
                    state.merge(HarvestState.load(_shard_file(folder, j, n)))
        logits = None
        if is_causal(hm.model):
            W_U = hm.model.get_output_embeddings().weight
            if W_U.shape[1] == c.d_in:
                logits = logit_tokens(sae.W_dec.detach(), W_U.detach(), cfg.n_logits)
        vocab = tokenizer_vocab(hm.tokenizer)
        key = vocab_key(c.model, vocab)
        store_vocab(conn, key, vocab)
        try:
            metrics = read_cfg(sae_path).get("metrics") or {}
        except Exception:  # noqa: BLE001 - metrics are optional decoration
            metrics = {}
        meta = SAEMeta(model=c.model, layer=c.layer, site=c.site, d_in=c.d_in, n_features=c.n_latents, arch=c.arch,
                       k=c.k, path=str(Path(sae_path).resolve()), metrics=metrics if isinstance(metrics, dict) else {},
                       weights_sha=sha)
        info = {"corpus": corpus, "tokens": state.n_tokens, "ctx": ctx, "ctx_len": ctx_len, "top": top, "shards": n,
                "seed": cfg.seed}
        out = write_harvest(conn, name, meta, state.result_chunks(logits), tokenizer=key, harvest_info=info,
                            replace=replace)
        if n > 1:  # still under the lock: a shard that looks next finds its state gone, i.e. merged
            for j in range(n):
                _shard_file(folder, j, n).unlink(missing_ok=True)
        return {"features": out["features"], "examples": out["examples"], "tokens": state.n_tokens,
                "seconds": round(time.perf_counter() - t0, 2), "labels_kept": out["labels_kept"]}
    finally:
        conn.close()


# ---------------------------------------------------------------- showing a feature
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
        scores = ", ".join(f"{s['scorer']}={s['value']:.3f}" if s["value"] is not None else f"{s['scorer']}=n/a"
                           for s in lab["scores"])
        text = lab["label"] if lab["label"] is not None else f"(failed: {lab['failure']})"
        con.print(f"label [{escape(lab['explainer'])} {escape(lab['prompt_version'])}]: {escape(text)}"
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
