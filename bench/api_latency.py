"""HTTP API latency under uvicorn, against the catalog in DATABASE_URL:

- the feature endpoint (GET /saes/{name}/features/{idx}, random features): p50 and p95;
- the search endpoint (GET /features?q=) against the in-process search function on the same queries, one after
  the other on each query: p95 of both, their difference, and the median of the per-query differences;
- requests/s with 16 concurrent clients (a mix: 3 feature pages to 1 search).

Starts `interp serve` on a free port unless --url names a running server. The queries are words taken from
the catalog's own labels. Prints a table and one JSON line. Run with
`flock /tmp/bench.lock python bench/api_latency.py [--sae NAME]`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from interp.db import connect
from interp.store.saes import list_saes

ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def start_server(port: int, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "interp.cli", "serve", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("interp serve did not start within 60 s")


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - t) * 1000


def get_ok(client: httpx.Client, path: str, **kwargs) -> None:
    client.get(path, **kwargs).raise_for_status()


def queries_from_labels(conn, n: int, rng: random.Random) -> list[str]:
    from interp.search import search

    words = set()
    for probe in ("the", "token", "word", "number", "name"):
        for r in search(conn, probe, limit=200, semantic=False):
            words.update(w for w in r.label.lower().split() if len(w) > 3 and w.isalpha())
    words = sorted(words) or ["the"]
    return [rng.choice(words) for _ in range(n)]


def feature_latency(client: httpx.Client, sae: str, n_features: int, n: int, rng: random.Random) -> list[float]:
    out = []
    for _ in range(n):
        idx = rng.randrange(n_features)
        out.append(timed(get_ok, client, f"/saes/{sae}/features/{idx}"))
    return out


def search_latency(client: httpx.Client, conn, queries: list[str]) -> tuple[list[float], list[float]]:
    from interp.search import search

    api, local = [], []
    for q in queries:
        local.append(timed(search, conn, q, limit=20))
        api.append(timed(get_ok, client, "/features", params={"q": q, "limit": 20}))
    return api, local


def throughput(base: str, sae: str, n_features: int, queries: list[str], clients: int, seconds: float) -> float:
    """Requests/s over `seconds` with `clients` threads, each on its own connection."""
    count, errors, stop = [0] * clients, [], time.monotonic() + seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.monotonic() < stop:
                if rng.random() < 0.75:
                    r = c.get(f"/saes/{sae}/features/{rng.randrange(n_features)}")
                else:
                    r = c.get("/features", params={"q": rng.choice(queries), "limit": 20})
                if r.status_code != 200:
                    errors.append(r.status_code)
                count[i] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed under load, e.g. HTTP {errors[0]}")
    return sum(count) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", help="SAE name (default: the one with the most features)")
    ap.add_argument("--url", help="a running server (default: start interp serve)")
    ap.add_argument("--requests", type=int, default=300, help="timed requests per latency measurement")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the throughput run")
    ap.add_argument("--server-log", default="/tmp/api_latency_serve.log", help="the started server's output")
    args = ap.parse_args()
    rng = random.Random(0)
    conn = connect()
    saes = list_saes(conn)
    if not saes:
        raise SystemExit("the catalog is empty: run interp harvest first")
    sae = next((s for s in saes if s.name == args.sae), None) if args.sae else max(saes, key=lambda s: s.n_features)
    if sae is None:
        raise SystemExit(f"no SAE named {args.sae!r}")
    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc, base = start_server(port, args.server_log), f"http://127.0.0.1:{port}"
    try:
        queries = queries_from_labels(conn, args.requests, rng)
        with httpx.Client(base_url=base, timeout=30) as client:
            feature_latency(client, sae.name, sae.n_features, 20, rng)      # warm the pool and the caches
            search_latency(client, conn, queries[:5])
            feat = feature_latency(client, sae.name, sae.n_features, args.requests, rng)
            api, local = search_latency(client, conn, queries)
        rps = throughput(base, sae.name, sae.n_features, queries, args.clients, args.seconds)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    res = {"bench": "api_latency", "sae": sae.name, "n_features": sae.n_features, "requests": args.requests,
           "feature_p50_ms": round(statistics.median(feat), 2), "feature_p95_ms": round(pct(feat, 0.95), 2),
           "search_api_p95_ms": round(pct(api, 0.95), 2), "search_inproc_p95_ms": round(pct(local, 0.95), 2),
           "search_overhead_p95_ms": round(pct(api, 0.95) - pct(local, 0.95), 2),
           # the same query timed both ways back to back: robust to load that shifts both distributions
           "search_overhead_paired_p50_ms": round(statistics.median(a - b for a, b in zip(api, local)), 2),
           "clients": args.clients, "requests_per_s": round(rps, 1)}
    print(f"{'measure':<34}{'value':>12}")
    for k, v in res.items():
        if k not in ("bench", "sae"):
            print(f"{k:<34}{v:>12}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
