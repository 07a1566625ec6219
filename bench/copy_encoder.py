"""Our binary COPY encoder (interp/pgbinary.py) against psycopg's own binary COPY (`set_types` + `write_row`)
on the same rows of one HarvestResult (synthetic codes, as bench/harvest_scale.py makes them).

Both sides COPY the features, contexts and examples rows into temporary tables of the catalog's column types,
back to back, `--repeats` times round-robin (best of each counts). Reported per side: wall seconds and the
client's CPU seconds (the server's work is the same on both sides; the client's is the encoder's). The rule
of the issue: keep ours only if it wins by >= 1.5x. Prints a table and one JSON line.
Run with `flock /tmp/bench.lock nice python bench/copy_encoder.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from interp.db import connect, migrate
from interp.store import harvest as store
from sae.harvest import KINDS, SPLITS, HarvestResult

sys.path.insert(0, str(Path(__file__).parent))
from harvest_scale import stream  # noqa: E402

TABLES = {
    "features": ["int4", "int4", "float4", "int8", "float4", "float4", "int4[]", "float4", "int4[]", "float4[]",
                 "int4[]", "float4[]"],
    "contexts": ["int4", "int4", "int4[]"],
    "examples": ["int4", "int4", "text", "text", "int2", "int4[]", "int2[]", "int2[]", "int2[]", "float4[]",
                 "bytea"],
}


def feature_rows(res: HarvestResult, sid: int):
    for i in range(res.n_features):
        yield (sid, res.offset + i, float(res.density[i]), int(res.n_fired[i]), float(res.max_act[i]),
               float(res.mean_act[i]), res.hist[i].tolist(), float(res.hist_max[i]), None, None, None, None)


def context_rows(res: HarvestResult, sid: int):
    for c in sorted(res.contexts):
        yield sid, c, res.contexts[c].tolist()


def example_rows(res: HarvestResult, sid: int):
    ex = res.examples
    starts, ends = store.example_groups(res)
    for a, b in zip(starts.tolist(), ends.tolist()):
        kind = int(ex.kind[a])
        yield (sid, int(ex.feature[a]), KINDS[kind], SPLITS[int(ex.split[a])], res.width, ex.ctx[a:b].tolist(),
               ex.start[a:b].tolist(), ex.max_pos[a:b].tolist(), ex.qbin[a:b].tolist() if kind == 1 else None,
               ex.scale[a:b].tolist(), ex.acts[a:b].tobytes())


def ours(cur, res: HarvestResult, sid: int) -> None:
    store._copy(cur, "bench_features", store.feature_blocks(res, sid))
    store._copy(cur, "bench_contexts", store.context_blocks(res, sid))
    store._copy(cur, "bench_examples", store.example_blocks(res, sid))


def psycopgs(cur, res: HarvestResult, sid: int) -> None:
    for table, rows in (("features", feature_rows), ("contexts", context_rows), ("examples", example_rows)):
        with cur.copy(f"COPY bench_{table} FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(TABLES[table])
            for row in rows(res, sid):
                cp.write_row(row)


def fetch_all(conn) -> dict[str, list]:
    return {t: conn.execute(f"SELECT * FROM bench_{t} ORDER BY 1, 2, 3").fetchall() for t in ("features", "contexts")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=16_384)
    ap.add_argument("--fires", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ns = argparse.Namespace(ctx_len=64, k=32, fires=args.fires, batch=64)
    st, _, _ = stream(args.features, ns)
    res = st.result()
    del st
    conn = connect()
    migrate(conn)
    for t in TABLES:
        conn.execute(f"CREATE TEMP TABLE bench_{t} (LIKE {t})")
    sides = {"ours (interp/pgbinary.py)": ours, "psycopg (set_types + write_row)": psycopgs}
    best = {name: (math.inf, math.inf) for name in sides}
    same = None
    for _ in range(args.repeats):
        for name, fn in sides.items():
            for t in TABLES:
                conn.execute(f"TRUNCATE bench_{t}")
            conn.commit()
            t0, c0 = time.perf_counter(), time.process_time()
            with conn.transaction():
                fn(conn.cursor(), res, 1)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            rows = fetch_all(conn)
            rows["examples"] = conn.execute("SELECT md5(string_agg(e::text, '|' ORDER BY feature, kind, split)) "
                                            "FROM bench_examples e").fetchone()[0]
            same = rows if same is None else same
            assert rows == same, f"{name} stored different rows"
    n_rows = res.n_features + len(res.contexts) + len(store.example_groups(res)[0])
    (ow, oc), (pw, pc) = best.values()
    print(f"copy encoder: {args.features} features, {len(res.examples)} examples, {n_rows} rows "
          f"(features, contexts, examples), best of {args.repeats}; both sides store identical rows")
    print(f"{'side':<34}{'wall s':>9}{'client CPU s':>14}{'rows/s':>12}")
    for name, (w, c) in best.items():
        print(f"{name:<34}{w:>9.2f}{c:>14.2f}{n_rows / w:>12,.0f}")
    print(f"ours wins by {pw / ow:.2f}x wall, {pc / oc:.2f}x client CPU (rule: keep ours only at >= 1.5x)")
    print(json.dumps({"benchmark": "copy_encoder", "features": args.features, "examples": len(res.examples),
                      "rows": n_rows, "ours_s": round(ow, 3), "psycopg_s": round(pw, 3), "ours_cpu_s": round(oc, 3),
                      "psycopg_cpu_s": round(pc, 3), "speedup_wall": round(pw / ow, 2),
                      "speedup_cpu": round(pc / oc, 2), "keep_ours": pw / ow >= 1.5}))
    conn.close()


if __name__ == "__main__":
    main()
