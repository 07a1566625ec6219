"""Labelling throughput on real workers against an OpenAI-compatible stub that answers every call after a fixed
latency, and the time to queue a very large job.

- throughput: one worker process (`celery ... worker --pool solo`) at LLM concurrency C; features/s, the ratio to
  the ideal C / (calls per feature x latency), and worker CPU ms per feature; then the same with 2 processes;
- scale: queueing an N-feature job (job row, items by COPY, the first messages) and the broker's memory after.

The stub is one asyncio process (uvicorn, a bare ASGI app) so that it is not the bottleneck. Explainer `openai:`
plus the detection scorer: 1 explain call and 2 detection batches per feature.

    DATABASE_URL=... CELERY_BROKER_URL=redis://127.0.0.1:6379/5 python bench/label_throughput.py

Prints a table and one JSON line."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- the stub (its own process)
def serve_stub(port: int, latency: float) -> None:
    import uvicorn

    count, busy = [0], [0.0]     # calls, and seconds the calls were in flight (summed)

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        if scope["path"].endswith("/count"):
            return await _reply(send, {"calls": count[0], "busy_s": busy[0]})
        t = time.perf_counter()
        req = json.loads(body)
        count[0] += 1
        await asyncio.sleep(latency)
        busy[0] += time.perf_counter() - t
        m = re.search(r"Below are (\d+) numbered", req["messages"][0]["content"])
        content = json.dumps([1] * int(m.group(1))) if m else "Label: the bench token"
        await _reply(send, {"id": "b", "object": "chat.completion", "created": 0, "model": req.get("model", "b"),
                            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": content}}],
                            "usage": {"prompt_tokens": 200, "completion_tokens": 10, "total_tokens": 210}})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


async def _reply(send, obj) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_calls(url: str) -> int:
    return stub_counts(url)[0]


def stub_counts(url: str) -> tuple[int, float]:
    """(calls answered, seconds of calls in flight summed over calls) so far."""
    with urllib.request.urlopen(url + "/count", data=b"{}", timeout=5) as r:
        got = json.loads(r.read())
    return got["calls"], got["busy_s"]


# ---------------------------------------------------------------- workers
def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_workers(n: int, env: dict, logdir: Path) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        log = logdir / f"worker-{i}.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo", "--loglevel", "INFO",
             "-Q", env["JOB_QUEUE"], "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"bench{i}-{uuid.uuid4().hex[:4]}@%h"], cwd=ROOT, env=env, stdout=open(log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True))
    for i in range(n):
        log = logdir / f"worker-{i}.log"
        end = time.monotonic() + 120
        while b"ready." not in log.read_bytes():
            if time.monotonic() > end or procs[i].poll() is not None:
                raise SystemExit(f"worker {i} did not start; see {log}")
            time.sleep(0.2)
    return procs


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def throughput(conn, n_workers: int, n_features: int, env: dict, stub_url: str, logdir: Path) -> dict:
    from interp.labelling import LabelRequest, broker_app, queue_job
    from interp.store.jobs import ACTIVE, summaries
    from tests.jobs_support import make_sae

    sae = make_sae(conn, n_features)
    procs = start_workers(n_workers, env, logdir)
    try:
        (calls0, busy0), cpu0, t0 = stub_counts(stub_url), sum(cpu_s(p.pid) for p in procs), time.perf_counter()
        job = queue_job(conn, LabelRequest(sae=sae, features=f"0:{n_features}", explainer="openai:bench",
                                           scorers=("detection",)), broker_app())
        while (j := summaries(conn, job.job_id)[0]).state in ACTIVE:
            time.sleep(0.1)
        wall, cpu = time.perf_counter() - t0, sum(cpu_s(p.pid) for p in procs) - cpu0
        calls, busy = (a - b for a, b in zip(stub_counts(stub_url), (calls0, busy0)))
    finally:
        stop(procs)
        conn.execute("DELETE FROM saes WHERE name = %s", (sae,))
    if j.state != "done" or j.n_failed:
        raise SystemExit(f"bench job ended {j.state} with {j.n_failed} failures: {j.failures}")
    return {"workers": n_workers, "features": n_features, "seconds": round(wall, 2),
            "features_per_s": round(n_features / wall, 1), "calls_per_feature": round(calls / n_features, 2),
            "cpu_ms_per_feature": round(1000 * cpu / n_features, 2),
            # how full the endpoint was kept (the ratio's other side: a worker short of CPU or waiting on itself)
            "mean_in_flight": round(busy / wall, 1), "worker_cpu_share": round(cpu / wall / n_workers, 2)}


def bare_sdk(stub_url: str, calls: int, concurrency: int) -> dict:
    """The calibration: the bare openai SDK (AsyncOpenAI) at the same concurrency against the same stub, with a
    prompt of the explain prompt's size: requests/s and client CPU ms per request."""
    import openai

    msg = [{"role": "system", "content": "You label features. " * 40}, {"role": "user", "content": "x " * 400}]

    async def run():
        client = openai.AsyncOpenAI(base_url=stub_url, api_key="bench", max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                await client.chat.completions.create(model="bench", messages=msg, max_tokens=60)

        await asyncio.gather(*(one() for _ in range(calls)))
        await client.close()

    t, c = time.perf_counter(), time.process_time()
    asyncio.run(run())
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"calls": calls, "requests_per_s": round(calls / wall, 1),
            "cpu_ms_per_request": round(1000 * cpu / calls, 2)}


def scale(conn, n_features: int) -> dict:
    """Queue an n-feature job (the catalog rows are set up first, untimed), then cancel and drop it."""
    import redis

    from interp.labelling import LabelRequest, broker_app, queue_job
    from interp.settings import get_settings
    from interp.store.jobs import cancel
    from tests.jobs_support import make_sae

    sae = make_sae(conn, n_features, with_examples=False)
    app = broker_app()
    r = redis.Redis.from_url(get_settings().celery_broker_url)
    mem0 = r.info("memory")["used_memory"]
    try:
        t = time.perf_counter()
        job = queue_job(conn, LabelRequest(sae=sae, features=f"0:{n_features}"), app)
        seconds = time.perf_counter() - t
        queued = r.llen(get_settings().job_queue)
        mem = r.info("memory")["used_memory"] - mem0
        cancel(conn, job.job_id)
    finally:
        conn.execute("DELETE FROM saes WHERE name = %s", (sae,))
        r.delete(get_settings().job_queue)
    return {"features": n_features, "queue_seconds": round(seconds, 2), "items": job.n_items,
            "messages_in_broker": queued, "broker_memory_kib": round(mem / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=16384,
                    help="features labelled per throughput run (16 chunks: the first chunk's cold start, its "
                         "connections and prepared statements, weighs a sixteenth)")
    ap.add_argument("--concurrency", type=int, default=64, help="LLM calls in flight per worker process")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds the stub takes per call")
    ap.add_argument("--chunk", type=int, help="features per task (default: settings.job_chunk_size)")
    ap.add_argument("--scale", type=int, default=1_000_000, help="features in the queued-job test (0: skip)")
    ap.add_argument("--workers", default="1,2", help="worker process counts to run")
    ap.add_argument("--sdk-calls", type=int, default=3000, help="calls of the bare-SDK calibration (0: skip)")
    ap.add_argument("--stub", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stub:
        return serve_stub(a.stub, a.latency)

    from interp.db import connect, migrate

    port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--stub", str(port), "--latency", str(a.latency)],
                            start_new_session=True)
    stub_url = f"http://127.0.0.1:{port}/v1"
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    if a.chunk is None:
        from interp.settings import Settings
        a.chunk = Settings().job_chunk_size      # not get_settings(): it would cache before the env below
    os.environ.update(JOB_QUEUE=queue, JOB_CHUNK_SIZE=str(a.chunk), OPENAI_BASE_URL=stub_url, OPENAI_API_KEY="bench",
                      LLM_CONCURRENCY=str(a.concurrency), JOB_WINDOW="4", PYTHONPATH=str(ROOT))
    env = dict(os.environ)
    logdir = Path(f"/tmp/{queue}")
    logdir.mkdir()
    rows = []
    try:
        for _ in range(100):
            try:
                stub_calls(stub_url)
                break
            except OSError:
                time.sleep(0.1)
        sdk = bare_sdk(stub_url, a.sdk_calls, a.concurrency) if a.sdk_calls else None
        with connect() as conn:
            migrate(conn)
            for n in [int(x) for x in a.workers.split(",") if x]:
                rows.append(throughput(conn, n, a.features, env, stub_url, logdir))
            big = scale(conn, a.scale) if a.scale else None
    finally:
        os.killpg(stub.pid, signal.SIGTERM)
    for r in rows:
        r["ideal_features_per_s"] = round(r["workers"] * a.concurrency / (r["calls_per_feature"] * a.latency), 1)
        r["ratio_to_ideal"] = round(r["features_per_s"] / r["ideal_features_per_s"], 3)
    print(f"{'workers':>7} {'features/s':>10} {'ideal':>7} {'ratio':>6} {'calls/feat':>10} {'cpu ms/feat':>11} "
          f"{'in flight':>9} {'cpu/core':>8}")
    for r in rows:
        print(f"{r['workers']:>7} {r['features_per_s']:>10} {r['ideal_features_per_s']:>7} {r['ratio_to_ideal']:>6} "
              f"{r['calls_per_feature']:>10} {r['cpu_ms_per_feature']:>11} {r['mean_in_flight']:>9} "
              f"{r['worker_cpu_share']:>8}")
    if sdk:
        print(f"bare openai SDK, same stub and concurrency: {sdk['requests_per_s']} requests/s "
              f"(ideal {a.concurrency / a.latency:g}), {sdk['cpu_ms_per_request']} ms CPU per request")
    if big:
        print(f"queued a {big['features']:,}-feature job in {big['queue_seconds']} s; {big['messages_in_broker']} "
              f"messages in the broker, +{big['broker_memory_kib']} KiB broker memory")
    print(json.dumps({"bench": "label_throughput", "latency_s": a.latency, "concurrency": a.concurrency,
                      "chunk": a.chunk, "throughput": rows, "bare_sdk": sdk, "scale": big}))


if __name__ == "__main__":
    main()
