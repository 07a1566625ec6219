"""Harvest at scale: a synthetic SAE with many features (1 M is the target), codes synthesised directly
(no model: this measures the per-feature state, the finalisation and the catalog, not the forward).

With --baseline N (default 16,384) a run of N features streams first, back to back, for the rate ratio the
issue's goal names (>= 0.5 at 1 M features); CPU-time rates are given too, fairer on a shared machine.

Every feature fires often enough (--fires per feature) that it gets its full example sets: 50 top
contexts, 10 x 5 quantile samples, 20 random non-firing contexts, 32-token windows. Reports peak RSS,
streaming rate, the load into Postgres (rows/s, examples/s, features/s) and the database bytes per
feature. Prints a table and one JSON line. Run with `flock /tmp/bench.lock python bench/harvest_scale.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
import uuid

import numpy as np
import torch
from tqdm import tqdm

from interp.db import connect, migrate
from interp.store.harvest import write_harvest
from interp.store.saes import SAEMeta
from sae.harvest import HarvestConfig, HarvestState

SIZE_SQL = """SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass"""


def table_bytes(conn) -> dict[str, int]:
    return {t: conn.execute(SIZE_SQL, (t,)).fetchone()[0] for t in ("features", "examples", "contexts")}


def synthetic_codes(i: int, n_tok: int, F: int, k: int, gen: torch.Generator):
    """k distinct features per token (a random offset plus a fixed stride), activations uniform up to a
    per-feature scale, so every quantile bin of every feature has tokens to sample."""
    base = torch.randint(0, F, (n_tok, 1), generator=gen)
    idx = (base + torch.arange(k) * (F // k)) % F
    vals = torch.rand(n_tok, k, generator=gen) * (1 + (idx % 7).float() / 7)
    return vals, idx


def stream(F: int, args) -> tuple[HarvestState, float, float]:
    """(the state, wall seconds, CPU seconds) of streaming F features' synthetic codes."""
    L, k = args.ctx_len, args.k
    n_ctx = math.ceil(F * args.fires / k / L)
    st = HarvestState(F, L, HarvestConfig())
    gen = torch.Generator().manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    with tqdm(total=n_ctx * L, unit="tok", unit_scale=True, desc=f"stream {F}", leave=False) as bar:
        for b0 in range(0, n_ctx, args.batch):
            b = min(args.batch, n_ctx - b0)
            vals, idx = synthetic_codes(b0, b * L, F, k, gen)
            st.update(torch.arange(b0, b0 + b), torch.randint(0, 50257, (b, L), generator=gen), vals, idx)
            bar.update(b * L)
    st.top.flush()
    st.res.flush()
    return st, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=1_000_000)
    ap.add_argument("--baseline", type=int, default=16_384,
                    help="first stream this many features (same fires per feature) for the rate ratio; 0: skip")
    ap.add_argument("--fires", type=int, default=400, help="average firing tokens per feature")
    ap.add_argument("--k", type=int, default=32, help="active features per token")
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="contexts per update")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="leave the synthetic SAE in the catalog")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    F, L, k = args.features, args.ctx_len, args.k
    base = None
    if args.baseline:
        small, wall, cpu = stream(args.baseline, args)
        base = (small.n_tokens / wall, small.n_tokens / cpu)
        del small
    st, stream_s, stream_cpu = stream(F, args)
    n_tok = st.n_tokens
    rss_stream_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # the peak so far
    # printed before the load, so a failing database does not take the streaming numbers with it
    print(json.dumps({"stream": F, "stream_tok_s": round(n_tok / stream_s), "stream_cpu_tok_s": round(n_tok / stream_cpu),
                      "baseline_tok_s": round(base[0]) if base else None,
                      "baseline_cpu_tok_s": round(base[1]) if base else None,
                      "peak_rss_stream_gib": round(rss_stream_gib, 2)}), flush=True)

    conn = connect()
    migrate(conn)
    name = f"bench_scale_{uuid.uuid4().hex[:8]}"
    before = table_bytes(conn)
    meta = SAEMeta(model="synthetic", layer=0, site="resid", d_in=64, n_features=F, arch="topk", k=k)
    # finalising and loading interleave (a chunk of features at a time): time the two apart
    finalise_s, kinds = 0.0, np.zeros(3)

    def timed(chunks):
        nonlocal finalise_s
        while True:
            t = time.perf_counter()
            part = next(chunks, None)
            finalise_s += time.perf_counter() - t
            if part is None:
                return
            kinds[:] += np.bincount(part.examples.kind, minlength=3)
            yield part

    t0 = time.perf_counter()
    out = write_harvest(conn, name, meta, timed(st.result_chunks()))
    load_s = time.perf_counter() - t0 - finalise_s
    width = st.width
    del st
    full = tuple(kinds / F)
    conn.execute("ANALYZE features; ANALYZE examples; ANALYZE contexts")
    after = table_bytes(conn)
    grown = {t: after[t] - before[t] for t in after}
    rows = F + out["example_rows"] + out["contexts"]
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not args.keep:
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))
    conn.close()

    per_feature = {t: v / F for t, v in grown.items()}
    print(f"harvest scale: {F} features, {n_tok} synthetic tokens, k={k}, ctx {L}, window {width}, "
          f"{args.threads} thread(s)")
    print(f"examples per feature: top {full[0]:.1f}, quantile {full[1]:.1f}, random {full[2]:.1f}")
    table = [("stream (state updates)", f"{stream_s:.1f} s", f"{n_tok / stream_s:,.0f} tok/s"),
             ("finalise (choose examples)", f"{finalise_s:.1f} s", "interleaved with the load, chunk by chunk"),
             ("load into Postgres", f"{load_s:.1f} s",
              f"{rows / load_s:,.0f} rows/s, {out['examples'] / load_s:,.0f} examples/s, {F / load_s:,.0f} features/s"),
             ("DB bytes per feature", f"{sum(per_feature.values()):,.0f} B",
              ", ".join(f"{t} {v:,.0f}" for t, v in per_feature.items())),
             ("peak RSS", f"{rss_gib:.2f} GiB", f"{rss_stream_gib:.2f} GiB by the end of streaming")]
    ratio = None
    if base:
        ratio = (n_tok / stream_s / base[0], n_tok / stream_cpu / base[1])
        table.insert(1, (f"stream, {args.baseline} features", f"{base[0]:,.0f}", f"tok/s just before; this run "
                         f"streams at {ratio[0]:.2f}x its rate ({ratio[1]:.2f}x in CPU time)"))
    for row in table:
        print(f"{row[0]:<28}{row[1]:>12}   {row[2]}")
    print(json.dumps({"benchmark": "harvest_scale", "features": F, "tokens": n_tok, "stream_tok_s": round(n_tok / stream_s),
                      "stream_cpu_tok_s": round(n_tok / stream_cpu), "baseline_features": args.baseline or None,
                      "baseline_tok_s": round(base[0]) if base else None,
                      "rate_vs_baseline": round(ratio[0], 3) if ratio else None,
                      "cpu_rate_vs_baseline": round(ratio[1], 3) if ratio else None,
                      "finalise_s": round(finalise_s, 1), "load_s": round(load_s, 1), "db_rows": rows,
                      "rows_per_s": round(rows / load_s), "examples_per_s": round(out["examples"] / load_s),
                      "features_per_s": round(F / load_s), "bytes_per_feature": round(sum(per_feature.values())),
                      "bytes_per_feature_by_table": {t: round(v) for t, v in per_feature.items()},
                      "examples_per_feature": [round(x, 1) for x in full], "peak_rss_gib": round(rss_gib, 2),
                      "peak_rss_stream_gib": round(rss_stream_gib, 2)}))


if __name__ == "__main__":
    main()
