"""Catalog at scale (issue 10): N labelled, scored features bulk-loaded by COPY, hybrid search latency, and
streamed exports.

- Labels are synthetic: 3 to 7 words drawn by a Zipf law (exponent 1.07) over the builtin corpus's own
  vocabulary ranked by frequency, so a few words are in most labels and most words in few. A handful of planted
  labels give the typo ("golden gat" -> "Golden Gate Bridge ...") and synonym ("car" -> "automobiles and
  trucks ...") checks something to find.
- Load: features, then labels with two scores each, by COPY; the two GIN indexes are dropped before and built
  after (timed apart). rows/s counts explanations + scores.
- Semantic arm: embedding millions of labels with MiniLM takes hours on 2 cores, so a label's vector here is the
  normalised sum of its words' MiniLM vectors (each vocabulary word embedded once by the real model); planted
  labels and every query go through the real model. The usearch index is built from Postgres, timed, with the
  count of isolated labels it also keeps for exact search.
- Search: p50/p95 of the whole `interp.search.search` call (three arms, fusion, result rows) for selective
  queries (two tail words) and common words (the most frequent non-stop words; named in the output): first a
  cold pass of other selective queries as the load left the catalog, then, after reading the catalog's tables,
  indexes and index files once (`prewarm`), the warm ones, as a serving catalog has them.
- Export: jsonl and parquet of the SAE (N features, at most --export-n) in a child process each: seconds and
  the child's peak RSS.

Prints a table and one JSON line. Example: `nice python bench/catalog_scale.py --n 200000`.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg

from interp.db import connect, migrate
from interp.store import bulk
from interp.store.saes import SAEMeta

PLANTED = ["Golden Gate Bridge in San Francisco", "automobiles and trucks on highways"]
STOP = set("the and for with that this from are was not but you can use have has its than then when which "
           "will would should could into also been were there their they them these those what how all any "
           "each other some such only one two may must more most return returns none true false self".split())


def vocabulary(n_words: int) -> list[str]:
    """The corpus's words ranked by frequency (3+ letters, lower case)."""
    from sae.corpus import iter_texts

    counts: collections.Counter = collections.Counter()
    seen = 0
    for text in iter_texts("builtin"):
        words = re.findall(r"[a-z]{3,}", text.lower())
        counts.update(words)
        seen += len(words)
        if seen > 3_000_000:
            break
    return [w for w, _ in counts.most_common(n_words)]


def label_stream(n: int, vocab: list[str], seed: int = 0):
    """(feature, label words) for features 0..n-1, Zipf-distributed words; planted labels every n/5 features."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
    p /= p.sum()
    plant_every = max(n // 5, 1)
    for a in range(0, n, 100_000):
        b = min(a + 100_000, n)
        lens = rng.integers(3, 8, b - a)
        words = rng.choice(len(vocab), int(lens.sum()), p=p)
        cuts = np.cumsum(lens)[:-1]
        for i, ws in zip(range(a, b), np.split(words, cuts)):
            if i % plant_every == 7:
                yield i, PLANTED[(i // plant_every) % 2]
            else:
                yield i, " ".join(vocab[w] for w in ws)


def scored(labels, seed: int = 1, block: int = 100_000):
    """Two random scores per label, drawn a block at a time (a draw per row cost more than the COPY of it)."""
    rng = np.random.default_rng(seed)
    vals = rng.random((0, 2)).tolist()
    for j, (i, label) in enumerate(labels):
        if j % block == 0:
            vals = rng.random((block, 2)).tolist()
        a, b = vals[j % block]
        yield bulk.ScoredLabel(feature=i, label=label, scores={"embedding": a, "detection": b})


def load(conn, name: str, n: int, vocab: list[str]) -> tuple[int, dict]:
    out = {}
    sid = bulk.create_sae(conn, name, SAEMeta(model="bench", layer=6, site="resid", d_in=768, n_features=n,
                                              arch="topk"))
    rng = np.random.default_rng(2)
    dens = rng.lognormal(-7, 1.5, n).clip(0, 1)
    t = time.perf_counter()
    bulk.copy_features(conn, sid, (bulk.FeatureStats(i, float(dens[i]), 5.0, 1.0) for i in range(n)))
    out["features_rows_s"] = n / (time.perf_counter() - t)
    bulk.drop_search_indexes(conn)
    try:
        t = time.perf_counter()
        bulk.copy_labels(conn, sid, scored(label_stream(n, vocab)))
        dt = time.perf_counter() - t
        out["labels_rows_s"] = 3 * n / dt            # one explanation + two scores per label
        out["labels_s"] = dt
    finally:
        t = time.perf_counter()
        with connect() as fresh:        # the load's connection may be the thing that failed
            bulk.create_search_indexes(fresh)
        out["index_build_s"] = time.perf_counter() - t
    return sid, out


def embed_compositional(conn, vocab: list[str], index_dir: str, rebuild: bool = True) -> dict:
    from interp import label_index
    from interp.store import search as store

    enc = label_index.load_encoder()
    out = {}
    if store.unembedded_labels(conn, 1):
        out |= embed_labels(conn, vocab, enc)
    t = time.perf_counter()
    bulk.vacuum_labels(conn)            # the bulk embedding rewrote every label row (see vacuum_labels)
    out["vacuum_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index = label_index.sync_index(conn, index_dir, rebuild=rebuild)
    out["usearch_build_s"] = time.perf_counter() - t
    out["isolated_labels"] = len(index.isolated)        # also searched exactly (see interp.label_index)
    return out


def embed_labels(conn, vocab: list[str], enc) -> dict:
    from interp import label_index
    from interp.store import search as store

    t = time.perf_counter()
    # centred: a plain sum of word vectors drifts towards the vocabulary's mean direction, which would make
    # every synthetic label look alike to every query
    words = label_index.embed(vocab, enc)
    wvec = dict(zip(vocab, words - words.mean(axis=0)))
    out = {"vocab_embed_s": time.perf_counter() - t}
    t, n = time.perf_counter(), 0
    while rows := store.unembedded_labels(conn, 50_000):
        ids, vecs = [], []
        for i, label in rows:
            if label in PLANTED or not all(w in wvec for w in label.split()):
                v = label_index.embed([label], enc)[0]
            else:
                v = np.sum([wvec[w] for w in label.split()], axis=0)
            ids.append(i)
            vecs.append(v / (np.linalg.norm(v) or 1.0))
        store.store_embeddings(conn, ids, np.stack(vecs), label_index.EMBED_MODEL)
        n += len(rows)
    out["embed_store_rows_s"] = n / max(time.perf_counter() - t, 1e-9)
    return out


def pct(xs, q):
    return float(np.percentile(np.array(xs) * 1000, q))


def latency(conn, name: str, vocab: list[str], index_dir: str, n_queries: int) -> dict:
    from interp.search import search

    rng = np.random.default_rng(3)
    tail = vocab[len(vocab) // 4:]
    selective = [" ".join(rng.choice(tail, 2)) for _ in range(n_queries)]
    common = [w for w in vocab if w not in STOP and len(w) >= 4][:10]

    def run(q):
        t = time.perf_counter()
        hits = search(conn, q, sae=name, limit=10, index_dir=index_dir)
        return time.perf_counter() - t, hits

    run("warm up the model and the index")
    cold = [run(" ".join(rng.choice(tail, 2)))[0] for _ in range(n_queries)]   # other queries than `selective`
    warm_s = prewarm(conn, index_dir)
    sel = [run(q)[0] for q in selective]
    com = [run(q)[0] for q in common for _ in range(max(1, n_queries // 10))]
    typo = [h.label for h in run("golden gat")[1]]
    syn = [h.label for h in run("car")[1]]
    out = {"cold_selective_p50_ms": pct(cold, 50), "cold_selective_p95_ms": pct(cold, 95), "prewarm_s": warm_s,
           "selective_p50_ms": pct(sel, 50), "selective_p95_ms": pct(sel, 95), "common_p50_ms": pct(com, 50),
           "common_p95_ms": pct(com, 95), "common_words": common,
           "typo_in_top10": PLANTED[0] in typo, "synonym_in_top10": PLANTED[1] in syn}
    return out | arm_latency(conn, name, selective, common, index_dir)


def prewarm(conn, index_dir: str) -> float | None:
    """Seconds to read the catalog's tables and indexes (pg_prewarm, into the OS cache) and the label index files,
    as a serving catalog has them: straight after a bulk load, on this VM, many of their pages were no longer
    cached, and each search paid disk reads (p95 over 100 ms, single queries over 3 s) that a second pass did
    not. None when pg_prewarm is not installed: then the warm numbers are not warm."""
    t = time.perf_counter()
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    except psycopg.Error as e:
        print(f"pg_prewarm unavailable ({str(e).strip()[:100]}): the catalog is searched as the load left it",
              file=sys.stderr)
        return None
    conn.execute("SELECT pg_prewarm(oid, 'read') FROM pg_class WHERE relkind IN ('r', 'i')"
                 " AND relname ~ '^(explanations|scores|label_|features)'")
    for f in Path(index_dir).glob("*.usearch"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t


def arm_latency(conn, name: str, selective: list[str], common: list[str], index_dir: str) -> dict:
    """p95 of each arm alone, so a slow search says which arm it was."""
    from interp.search import semantic_arm
    from interp.store import search as store
    from interp.store.saes import require_sae

    flt = store.Filters(sae_id=require_sae(conn, name))
    arms = {"fulltext": lambda q: store.fulltext_arm(conn, q, flt),
            "trigram": lambda q: store.trigram_arm(conn, q, flt),
            "semantic": lambda q: semantic_arm(conn, q, flt, index_dir)}
    out = {}
    for kind, queries in (("selective", selective), ("common", common)):
        for arm, f in arms.items():
            times = []
            for q in queries:
                t = time.perf_counter()
                try:
                    f(q)
                except store.ArmTimeout:    # counted at the time it took: search itself drops the arm then
                    pass
                times.append(time.perf_counter() - t)
            out[f"{arm}_{kind}_p95_ms"] = pct(times, 95)
    return out


# The child reads its peak RSS from VmHWM: ru_maxrss survives execve on Linux, so a child of this process (which
# holds MiniLM) would report the parent's peak.
CHILD = """
import json, re, sys
from interp.db import connect
from interp.export import export
with connect() as conn:
    s = export(conn, sys.argv[1], sys.argv[2], sys.argv[3])
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": s.seconds, "features": s.features, "peak_rss_mib": hwm / 1024}))
"""


def export_bench(name: str, fmt: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", CHILD, name, fmt, f"{d}/out.{fmt}"], capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="labelled features")
    ap.add_argument("--vocab", type=int, default=3000, help="corpus words in the Zipf vocabulary")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the synthetic SAE in the catalog")
    ap.add_argument("--resume", metavar="NAME", help="go on with the SAE a failed run left (it names it), "
                    "skipping the load: a Postgres restart mid-run costs only the stage it hit")
    ap.add_argument("--index-dir", help="usearch folder (default: a new temporary one)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)    # on a shared 2-core machine, torch's threads mostly wait on each other
    conn = connect()
    migrate(conn)
    bulk.create_search_indexes(conn)    # a no-op, unless a run stopped between dropping and building them
    name = args.resume or f"bench_catalog_{uuid.uuid4().hex[:6]}"
    vocab = vocabulary(args.vocab)
    res: dict = {"n": args.n, "vocab": len(vocab)}
    index_dir = args.index_dir or tempfile.mkdtemp(prefix="catalog-index-")
    print(f"SAE {name}, index {index_dir}", file=sys.stderr, flush=True)

    def stage(out: dict) -> None:
        res.update(out)
        print(json.dumps(out), file=sys.stderr, flush=True)     # partial results survive a later failure

    if not args.resume:
        stage(load(conn, name, args.n, vocab)[1])
    stage(embed_compositional(conn, vocab, index_dir, rebuild=not args.resume))
    stage(latency(conn, name, vocab, index_dir, args.queries))
    if not args.no_export:
        for fmt in ("parquet", "jsonl"):
            e = export_bench(name, fmt)
            stage({f"export_{fmt}_s": e["seconds"], f"export_{fmt}_rss_mib": e["peak_rss_mib"]})
    if not args.keep:       # a failed run leaves it, for --resume
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))
    for k, v in res.items():
        print(f"{k:>24}: {v:,.1f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(json.dumps({"bench": "catalog_scale", **res}))


if __name__ == "__main__":
    main()
