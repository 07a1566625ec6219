"""Labelling jobs, without Celery: queue a job, run one chunk of it, sweep expired leases.

`interp label` checks everything it can before a row is written (the SAE, the feature range, the explainer,
simulator and scorer specs, the broker, and with --check-endpoint the LLM endpoint), then writes the job and its
items and sends the first chunks. A worker's `label_chunk` task calls `run_chunk`: claim the chunk's items with a
lease, label and score them concurrently on one event loop under the shared rate limits, store each feature in one
transaction, then send the job's next chunks (`store.jobs.top_up`). Every worker's sweeper calls `sweep`.
The Celery app itself lives in `workers/`; this module sends tasks by name, so `interp` never imports it.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psycopg

from sae.errors import InputError

from . import prompts
from .db import redact_url
from .records import LabelResult
from .scorers import SCORERS
from .settings import get_settings
from .store import jobs
from .store.jobs import Chunk, FeatureOutcome, JobParams, JobSummary

log = logging.getLogger(__name__)
TASK = "workers.tasks.label_chunk"
Send = Callable[[list[Chunk]], None]


@dataclass(frozen=True)
class LabelRequest:
    """What `interp label` asks for."""
    sae: str
    features: str | None = None         # "A:B", half-open
    unlabeled: bool = False
    indices: tuple[int, ...] | None = None  # or these features (callers that pick them, e.g. the demo)
    explainer: str = "baseline"
    simulator: str | None = None
    scorers: tuple[str, ...] = ("embedding",)
    budget_tokens: int | None = None
    check_endpoint: bool = False
    window: int | None = None           # chunks in flight; default settings.job_window


def parse_range(text: str, n: int, sae: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--features {text!r} is not a range A:B (half-open, e.g. 0:1000)")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not lo < hi <= n:
        raise InputError(f"--features {text} is out of bounds: SAE {sae!r} has features 0..{n - 1} (give A:B with "
                         f"0 <= A < B <= {n})")
    return lo, hi


def explainer_version(explainer: str) -> str:
    return "baseline-v1" if explainer == "baseline" else prompts.DEFAULT_VERSIONS["explain"]


def scorer_pairs(req: LabelRequest) -> list[tuple[str, str]]:
    """(scorer, simulator) as the scores table keys them: the embedding scorer's model is MiniLM."""
    sim = req.simulator or req.explainer
    return [(s, "minilm" if s == "embedding" else sim) for s in req.scorers]


def check_specs(req: LabelRequest) -> None:
    """Unknown specs and scorers, a scorer that needs an LLM with none given, and with check_endpoint an LLM
    endpoint that does not answer: each one line, before anything is written."""
    from .llm import OpenAIClient, make_client

    bad = [s for s in req.scorers if s not in SCORERS]
    if bad or not req.scorers:
        raise InputError(f"unknown scorer {bad[0] if bad else ''!r}; choose from {', '.join(SCORERS)}")
    sim = req.simulator or req.explainer
    if sim == "baseline" and any(s != "embedding" for s in req.scorers):
        raise InputError("scorers simulation, detection and fuzzing need an LLM simulator (--simulator "
                         "openai:MODEL, openai:local or hf:PATH); with baseline only the embedding scorer runs")
    specs = [req.explainer] + ([sim] if any(s != "embedding" for s in req.scorers) else [])
    for spec in dict.fromkeys(specs):
        if spec.startswith("hf:") and len(spec) > 3:
            continue    # making the client would load the model here; the workers load it
        client = make_client(spec)
        if req.check_endpoint and isinstance(client, OpenAIClient):
            check_endpoint(spec, client.base_url, client.api_key)


def check_endpoint(spec: str, base_url: str | None, api_key: str) -> None:
    import httpx

    url = (base_url or "https://api.openai.com/v1").rstrip("/")
    try:
        httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5.0)
    except httpx.HTTPError as e:
        raise InputError(f"cannot reach the LLM endpoint of {spec} at {redact_url(url)}: {type(e).__name__} "
                         "(start it, or set OPENAI_BASE_URL)") from None


def broker_app():
    """A Celery app that only sends (no tasks, no result backend): the workers' app is in `workers.app`."""
    from celery import Celery

    s = get_settings()
    app = Celery("interp-client", broker=s.celery_broker_url, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=False,
                    broker_transport_options={"visibility_timeout": s.job_visibility_timeout_s})
    return app


def check_broker(app) -> None:
    from kombu.utils.url import maybe_sanitize_url

    # kombu's masking also covers redis://:PASSWORD@host, a form interp.db.redact_url lets through
    url = maybe_sanitize_url(app.conf.broker_url, mask="***")
    try:
        with app.connection_for_write() as c:
            c.ensure_connection(max_retries=1, interval_start=0.2, timeout=3)
    except Exception as e:  # noqa: BLE001 - kombu raises transport-specific errors; each means "unreachable"
        raise InputError(f"cannot reach the broker at {url}: {str(e).strip()[:160] or type(e).__name__}"
                         " (start it or set CELERY_BROKER_URL)") from None


def send_chunks(app, chunks: list[Chunk]) -> None:
    """Sends label_chunk tasks by name. A send that fails is logged, not raised: the chunk's lease expires
    and the sweeper sends it again."""
    queue = get_settings().job_queue
    for c in chunks:
        try:
            app.send_task(TASK, args=(c.job_id, c.first, c.last), queue=queue,
                          retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as e:  # noqa: BLE001 - any broker failure: the lease brings the chunk back
            log.warning("job %d: could not send chunk %d..%d (%s); its lease will bring it back",
                        c.job_id, c.first, c.last, str(e)[:200])


def select_features(req: LabelRequest, n: int) -> np.ndarray:
    """The features a request names, sorted: a range, every feature (--unlabeled), or a list."""
    if sum((req.features is not None, req.unlabeled, req.indices is not None)) != 1:
        raise InputError(f"give one of --features A:B (SAE {req.sae!r} has features 0..{n - 1}) or --unlabeled")
    if req.indices is not None:
        picked = np.unique(np.asarray(req.indices, dtype=np.int64))
        if len(picked) and (picked[0] < 0 or picked[-1] >= n):
            raise InputError(f"feature {picked[0] if picked[0] < 0 else picked[-1]} is out of bounds: SAE "
                             f"{req.sae!r} has features 0..{n - 1}")
        return picked
    lo, hi = parse_range(req.features, n, req.sae) if req.features else (0, n)
    return np.arange(lo, hi, dtype=np.int64)


def queue_job(conn: psycopg.Connection, req: LabelRequest, app) -> JobSummary:
    """Checks the request, writes the job and its items, sends its first chunks; returns its summary."""
    from .store.saes import n_features, require_sae

    s = get_settings()
    sid = require_sae(conn, req.sae)
    n = n_features(conn, sid)
    if req.budget_tokens is not None and req.budget_tokens <= 0:
        raise InputError(f"--budget-tokens must be a positive number of tokens, got {req.budget_tokens}")
    if req.window is not None and req.window <= 0:
        raise InputError(f"--window must be a positive number of chunks, got {req.window}")
    wanted = select_features(req, n)
    check_specs(req)
    check_broker(app)
    version = explainer_version(req.explainer)
    lo, hi = (int(wanted[0]), int(wanted[-1]) + 1) if len(wanted) else (0, 0)
    done = jobs.complete_features(conn, sid, req.explainer, version, scorer_pairs(req), lo, hi)
    todo = np.setdiff1d(wanted, done, assume_unique=True)
    params = JobParams(sae=req.sae, explainer=req.explainer, simulator=req.simulator, scorers=list(req.scorers),
                       prompt_version=version, window=req.window or s.job_window)
    job_id = jobs.create_job(conn, sid, params, todo, s.job_chunk_size, req.budget_tokens)
    send_chunks(app, jobs.top_up(conn, job_id, s.job_lease_s))
    return jobs.summaries(conn, job_id)[0]


def resume_job(conn: psycopg.Connection, job_id: int, budget_tokens: int | None, app) -> JobSummary:
    found = jobs.summaries(conn, job_id)
    if not found:
        raise InputError(f"no job {job_id}; `interp jobs` lists them")
    job = found[0]
    budget = budget_tokens if budget_tokens is not None else job.budget_tokens
    if budget is not None and job.tokens >= budget:
        raise InputError(f"job {job_id} has spent {job.tokens} of its {budget} budget tokens; resume it with a "
                         f"larger --budget-tokens")
    check_broker(app)
    if jobs.resume(conn, job_id, budget_tokens) is None:
        raise InputError(f"job {job_id} is {job.state}; only a paused, cancelled or failed job resumes")
    send_chunks(app, jobs.top_up(conn, job_id, get_settings().job_lease_s))
    return jobs.summaries(conn, job_id)[0]


# ---------------------------------------------------------------- the worker side

_REASONS = (("HTTP 429", "rate_limited"), ("HTTP 5", "server_error"), ("HTTP 4", "client_error"),
            ("timeout", "timeout"), ("connection error", "connection"), ("malformed", "malformed"),
            ("unparseable", "unparseable"), ("refusal", "refusal"), ("empty", "empty"),
            ("no activating examples", "no_examples"), ("has no feature", "no_feature"))


def failure_reason(text: str) -> str:
    """The category a failure line is counted under in `interp jobs` (the line itself is kept on the item)."""
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return "error"


def outcome(result: LabelResult, scorers: list[str]) -> FeatureOutcome:
    """Done when the feature has its label and a score from every requested scorer; failed, with a reason,
    otherwise (a score that came back undefined, with no failure, is a result: constant activations)."""
    ex = result.explanation
    tokens = ex.usage.total + sum(s.usage.total for s in result.scores)
    out = FeatureOutcome(feature=ex.index, explanation=ex, scores=result.scores, tokens=tokens)
    have = {s.scorer for s in result.scores if s.value is not None or s.failure is None}
    failed = [s.failure for s in result.scores if s.value is None and s.failure]
    if not ex.ok or ex.failure:
        out.error = ex.failure or "no label"
    elif failed or set(scorers) - have:
        out.error = f"scoring: {failed[0] if failed else 'missing ' + ', '.join(sorted(set(scorers) - have))}"
    if out.error:
        out.reason = failure_reason(out.error)
    return out


_POOLS: dict[int, object] = {}
LOADS_AHEAD = 2     # batches of a chunk loading from Postgres at once


def pool():
    """This process's connection pool (made after a fork: a pool is never shared across processes). Its check
    replaces a connection that died with a restarted database, so workers reconnect on their own."""
    from psycopg_pool import ConnectionPool

    pid = os.getpid()
    if pid not in _POOLS:
        from .db import database_url

        _POOLS[pid] = ConnectionPool(database_url(), min_size=1, max_size=8, timeout=10, open=True,
                                     # a commit lost to a crash leaves its item leased, so it is only redone:
                                     # the workers need not wait for each feature's WAL flush
                                     kwargs={"autocommit": True, "connect_timeout": 5,
                                             "options": "-c synchronous_commit=off"},
                                     check=ConnectionPool.check_connection)
    return _POOLS[pid]


def with_db(fn, *args):
    """fn(conn, *args) on a pooled connection, retried while the database is unreachable (a restart), up to
    settings.job_db_retry_s. Only idempotent work goes through here."""
    deadline = time.monotonic() + get_settings().job_db_retry_s
    delay = 0.2
    while True:
        try:
            with pool().connection() as conn:
                return fn(conn, *args)
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", str(e).strip()[:120], delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _load(conn, p: JobParams, feats: list[int]):
    from .store.features import load_many, no_feature

    fes, missing = load_many(conn, p.sae, feats)
    return fes, [FeatureOutcome(feature=f, explanation=None, reason="no_feature", error=no_feature(conn, p.sae, f))
                 for f in missing]


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}


@dataclass
class _Clients:
    """The LLM clients (under the fleet's limits) of this process's loop, kept from one chunk to the next."""
    settings: object            # the settings they were made from: new settings (a test's) make new clients
    specs: tuple[str, ...]
    clients: dict
    stack: contextlib.AsyncExitStack


_CLIENTS: dict[int, _Clients] = {}


def _loop() -> asyncio.AbstractEventLoop:
    """This process's event loop, kept between tasks (made after a fork, like the pool), so that a chunk starts on
    open connections to the endpoint and Redis and on the executor's running threads, where a loop per task
    connected and started them all again (~0.1 s with nothing in flight per chunk)."""
    pid = os.getpid()
    if pid not in _LOOPS:
        _LOOPS[pid] = asyncio.new_event_loop()
    return _LOOPS[pid]


async def _clients(specs: list[str]) -> dict:
    """{spec: client} for a chunk: the last chunk's clients when its specs and settings were the same (a worker
    runs chunks of one job in a row), else new ones, the old ones closed. One set at a time: interleaved jobs
    with different specs cost what a loop per task did."""
    from .ratelimit import limited_clients

    pid, key, s = os.getpid(), tuple(dict.fromkeys(specs)), get_settings()
    kept = _CLIENTS.get(pid)
    if kept is not None and kept.specs == key and kept.settings is s:
        return kept.clients
    await close_clients()
    stack = contextlib.AsyncExitStack()
    clients = await stack.enter_async_context(limited_clients(list(key)))
    _CLIENTS[pid] = _Clients(s, key, clients, stack)
    return clients


async def close_clients() -> None:
    kept = _CLIENTS.pop(os.getpid(), None)
    if kept is not None:
        await kept.stack.aclose()


def close_loop() -> None:
    """At a worker's shutdown: its clients closed, then its loop (connections go cleanly, no warnings)."""
    loop = _LOOPS.get(os.getpid())
    if loop is not None and not loop.is_running():      # a shutdown inside a task leaves its loop to exit
        del _LOOPS[os.getpid()]
        loop.run_until_complete(close_clients())
        loop.close()


_CHUNKS_SEEN: dict[int, int] = {}
GC_GEN0 = 50_000    # allocations between young collections (CPython's default is 700)


def settle_gc() -> None:
    """Before each of a process's first two chunks: what is alive (torch, transformers, then the first chunk's
    clients, pools and lazy imports: some hundreds of thousands of objects) moves out of the collector's sight,
    and young collections come less often. Before, every full collection walked that heap: a 100-180 ms stall
    of the event loop every second or two, 7% of a worker's time at 64 calls in flight, with the endpoint idle
    meanwhile (bench/label_throughput.py went from 0.75 to 0.83-0.86 of its ideal). What is frozen and later
    dies in a cycle is not collected: clients replaced by another job's, a bounded few."""
    pid = os.getpid()
    seen = _CHUNKS_SEEN[pid] = _CHUNKS_SEEN.get(pid, 0) + 1
    if seen <= 2:
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


def run_chunk(job_id: int, first: int, last: int, send: Send) -> int:
    """One task: claim, label, store, send the next chunks. Returns the number of features it stored."""
    s = get_settings()
    job = with_db(jobs.job_ref, job_id)
    if job is None or job.state not in jobs.ACTIVE:
        return 0
    feats = with_db(jobs.claim, job_id, job.sae_id, first, last, s.job_lease_s)
    settle_gc()
    stored = 0
    if feats:
        try:
            stored = _loop().run_until_complete(_label_leased(job_id, job, feats))
        except InputError as e:     # settings no worker can run, e.g. a simulator spec without its key here
            with_db(jobs.release, job_id, job.sae_id, feats)
            with_db(jobs.fail_job, job_id, str(e))
            return 0
    send(with_db(jobs.top_up, job_id, s.job_lease_s))
    return stored


async def _label_leased(job_id: int, job: jobs.JobRef, feats: list[int]) -> int:
    """The chunk as a pipeline of small batches sharing the clients (so their concurrency limit): one batch's
    features load from Postgres and another's results are stored, in threads, while the LLM calls of the rest
    run, so the endpoint never waits on the database. The lease is renewed meanwhile. Once a store finds the job
    paused (its budget) or cancelled, batches not yet labelled go back to queued."""
    s = get_settings()
    p, stop = job.params, asyncio.Event()
    # two loads at a time, in batch order: they keep ahead of the calls, and the chunk's first calls go out after
    # the first load instead of after them all (every load thread takes the GIL from the loop)
    loads = asyncio.Semaphore(LOADS_AHEAD)
    batches = [feats[i:i + s.job_batch] for i in range(0, len(feats), s.job_batch)]
    renewer = asyncio.create_task(_renew(job_id, job.sae_id, feats))
    try:
        clients = await _clients([p.explainer, p.simulator or p.explainer])
        done = await asyncio.gather(*(_batch(job_id, job, b, clients, stop, loads) for b in batches))
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
    return sum(done)


async def _batch(job_id: int, job: jobs.JobRef, feats: list[int], clients: dict, stop: asyncio.Event,
                 loads: asyncio.Semaphore) -> int:
    from .scorers import label_features

    p = job.params
    async with loads:
        fes, outcomes = await asyncio.to_thread(with_db, _load, p, feats)
    if stop.is_set():
        await asyncio.to_thread(with_db, jobs.release, job_id, job.sae_id, feats)
        return 0
    if fes:
        results = await label_features(fes, p.explainer, p.simulator, p.scorers, clients=clients)
        outcomes += [outcome(r, p.scorers) for r in results]
    state = await asyncio.to_thread(_store, job_id, job.sae_id, outcomes)
    if state not in jobs.ACTIVE:
        stop.set()
    return len(outcomes)


def _store(job_id: int, sid: int, outcomes: list[FeatureOutcome]) -> str:
    """A batch's features in one transaction on a pooled connection; retried whole on a database error
    (features already stored do not move again, so nothing counts twice)."""
    return with_db(jobs.finish_features, job_id, sid, outcomes)


async def _renew(job_id: int, sid: int, feats: list[int]) -> None:
    s = get_settings()
    while True:
        await asyncio.sleep(s.job_lease_s / 3)
        try:
            await asyncio.to_thread(with_db, jobs.renew, job_id, sid, feats, s.job_lease_s)
        except psycopg.OperationalError as e:
            log.warning("job %d: lease not renewed (%s)", job_id, str(e)[:120])


def sweep(send: Send) -> int:
    """Every live worker, on a timer: expired leases back to the queue and their chunks sent again, and each
    active job's window of chunks topped up (a chunk that died between storing and sending leaves a gap).
    Returns the number of chunks sent."""
    s = get_settings()

    def once(conn):
        chunks = jobs.expire_leases(conn, s.job_lease_s)
        for job_id in jobs.active_jobs(conn):
            chunks += jobs.top_up(conn, job_id, s.job_lease_s)
        return chunks

    chunks = with_db(once)
    send(chunks)
    return len(chunks)
