"""Labelling jobs and their items: creation by COPY, leases, per-feature completion and the sweeper's queries.

An item is claimed by one UPDATE ... RETURNING that leases it; a feature's result, its item's new state and the
job's counters commit in one transaction, and an item moves to done or failed only from queued or running, so a
repeated write (a redelivered chunk, a lease that expired under a slow worker) changes no count. The broker is a
fast path: an item whose lease expires goes back to queued and its chunk is sent again (see `expire_leases`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from interp import pgbinary
from interp.pgbinary import Col
from interp.records import Explanation, Score

from .labels import upsert_explanations, upsert_scores

ACTIVE = ("queued", "running")


class JobParams(BaseModel):
    """What a job's workers need to label its features; stored in jobs.params."""
    sae: str
    explainer: str
    simulator: str | None = None
    scorers: list[str]
    prompt_version: str             # the explainer's, so a rerun finds what is already stored
    window: int = 16                # chunks in the broker or a worker at once


class JobSummary(BaseModel):
    job_id: int
    sae: str
    state: str
    n_items: int
    n_done: int
    n_failed: int
    tokens: int
    failures: dict[str, int]
    created: datetime
    finished: datetime | None
    budget_tokens: int | None = None
    reason: str | None = None
    explainer: str | None = None
    scorers: list[str] = []
    kind: str = "label"             # or harvest


@dataclass
class Chunk:
    """A chunk to send to the broker: the job's items with features first..last."""
    job_id: int
    first: int
    last: int


@dataclass
class FeatureOutcome:
    """One feature's result as the worker stores it."""
    feature: int
    explanation: Explanation | None
    scores: list[Score] = field(default_factory=list)
    reason: str | None = None       # failure category; None when the feature is done
    error: str | None = None        # the full failure line
    tokens: int = 0


def create_job(conn: psycopg.Connection, sid: int, params: JobParams, features: np.ndarray, chunk_size: int,
               budget_tokens: int | None) -> int:
    """The job row and one queued item per feature (binary COPY), in one transaction; returns the job id."""
    features = np.asarray(features, dtype=np.int64)
    n = len(features)
    n_chunks = -(-n // chunk_size)
    with conn.transaction():
        job_id = conn.execute(
            "INSERT INTO jobs (sae_id, kind, params, state, n_items, budget_tokens, chunk_size, n_chunks, finished)"
            " VALUES (%s, 'label', %s, CASE WHEN %s = 0 THEN 'done' ELSE 'queued' END, %s, %s, %s, %s,"
            " CASE WHEN %s = 0 THEN now() END) RETURNING id",
            (sid, Jsonb(params.model_dump()), n, n, budget_tokens, chunk_size, n_chunks, n)).fetchone()[0]
        block = 1 << 18
        with conn.cursor().copy("COPY job_items (job_id, sae_id, feature, chunk) FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(pgbinary.HEADER)
            for a in range(0, n, block):
                part = features[a:a + block]
                m = len(part)
                cp.write(pgbinary.rows([Col(">i8", np.full(m, job_id)), Col(">i4", np.full(m, sid)),
                                        Col(">i4", part), Col(">i4", (np.arange(a, a + m) // chunk_size))], m))
            cp.write(pgbinary.TRAILER)
    conn.execute("ANALYZE job_items")   # plans for the claims and top-ups that follow must see the new rows
    return job_id


def complete_features(conn: psycopg.Connection, sid: int, explainer: str, prompt_version: str,
                      scorers: list[tuple[str, str]], lo: int, hi: int) -> np.ndarray:
    """Features in lo..hi-1 that already have a label from this explainer and prompt version and a score
    from every (scorer, simulator): a rerun skips them."""
    rows = conn.execute(
        "SELECT e.feature FROM explanations e WHERE e.sae_id = %s AND e.explainer = %s AND e.prompt_version = %s"
        " AND e.label IS NOT NULL AND e.feature >= %s AND e.feature < %s AND (SELECT count(*) FROM scores s"
        " WHERE s.explanation_id = e.id AND (s.scorer, s.simulator) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " AND (s.value IS NOT NULL OR s.failure IS NULL)) = %s",
        (sid, explainer, prompt_version, lo, hi, [s for s, _ in scorers], [m for _, m in scorers],
         len(scorers))).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


@dataclass
class JobRef:
    """What a worker reads of its job before claiming."""
    state: str
    sae_id: int
    params: JobParams


def job_ref(conn: psycopg.Connection, job_id: int) -> JobRef | None:
    row = conn.execute("SELECT state, sae_id, params FROM jobs WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else JobRef(row[0], row[1], JobParams(**row[2]))


def claim(conn: psycopg.Connection, job_id: int, sid: int, first: int, last: int, lease_s: float) -> list[int]:
    """Leases the queued items of features first..last of an active job that is under its budget; returns
    their features. The job turns running."""
    with conn.transaction():
        rows = conn.execute(
            "UPDATE job_items SET state = 'running', lease_until = now() + make_interval(secs => %s),"
            " attempts = attempts + 1, updated = now()"
            " WHERE job_id = %s AND sae_id = %s AND feature BETWEEN %s AND %s AND state = 'queued'"
            " AND EXISTS (SELECT 1 FROM jobs j"
            " WHERE j.id = %s AND j.state IN ('queued', 'running')"
            " AND (j.budget_tokens IS NULL OR j.tokens < j.budget_tokens)) RETURNING feature",
            (lease_s, job_id, sid, first, last, job_id)).fetchall()
        if rows:
            conn.execute("UPDATE jobs SET state = 'running', updated = now() WHERE id = %s AND state = 'queued'",
                         (job_id,))
    return sorted(r[0] for r in rows)


def renew(conn: psycopg.Connection, job_id: int, sid: int, features: list[int], lease_s: float) -> int:
    """Extends the lease of the job's items still running among `features`; returns how many."""
    return conn.execute(
        "UPDATE job_items SET lease_until = now() + make_interval(secs => %s) WHERE job_id = %s AND sae_id = %s"
        " AND feature = ANY(%s) AND state = 'running'", (lease_s, job_id, sid, features)).rowcount


def finish_features(conn: psycopg.Connection, job_id: int, sid: int, outs: list[FeatureOutcome]) -> str:
    """Stores a batch of features' results, their items' states and the job's counters in one transaction;
    returns the job's state after it (done when these were its last items, paused when its budget is reached).
    One transaction per batch, not per feature: the items' moves and the job's counters are one statement each
    for the batch instead of one per feature."""
    with conn.transaction():
        _store_results(conn, sid, outs)
        moved = {r[0] for r in conn.execute(
            "UPDATE job_items i SET state = v.state, reason = v.reason, error = v.error, lease_until = NULL,"
            " updated = now() FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[]) AS v(feature, state,"
            " reason, error) WHERE i.job_id = %s AND i.sae_id = %s AND i.feature = v.feature"
            " AND i.state IN ('queued', 'running') RETURNING i.feature",
            ([o.feature for o in outs], ["failed" if o.reason else "done" for o in outs], [o.reason for o in outs],
             [o.error for o in outs], job_id, sid)).fetchall()}
        mine = [o for o in outs if o.feature in moved]
        # tokens count with their item's move, so a repeated write (a retried transaction) never counts them twice
        return _count(conn, job_id, sum(o.tokens for o in mine), sum(not o.reason for o in mine),
                      sum(bool(o.reason) for o in mine))


def _store_results(conn: psycopg.Connection, sid: int, outs: list[FeatureOutcome]) -> None:
    labelled = [o for o in outs if o.explanation is not None]
    stored = upsert_explanations(conn, sid, [o.explanation for o in labelled])
    scored = []
    for out in labelled:
        eid, label = stored[out.feature]
        if out.scores and label != out.explanation.label:
            # a label kept from an earlier run (its scores had failed) differs from this run's: these scores
            # rate another text and must not be filed under the kept one
            out.scores, out.reason = [], "label_changed"
            out.error = f"stored label {label!r} differs from this run's {out.explanation.label!r}; not scored"
        scored += [(eid, s) for s in out.scores]
    upsert_scores(conn, scored)


def _count(conn: psycopg.Connection, job_id: int, tokens: int, done: int, failed: int) -> str:
    return conn.execute(
        "UPDATE jobs SET tokens = tokens + %(t)s, n_done = n_done + %(d)s, n_failed = n_failed + %(f)s,"
        " updated = now(),"
        " state = CASE WHEN state NOT IN ('queued', 'running') THEN state"
        "   WHEN n_done + n_failed + %(d)s + %(f)s >= n_items THEN 'done'"
        "   WHEN budget_tokens IS NOT NULL AND tokens + %(t)s >= budget_tokens THEN 'paused' ELSE state END,"
        " reason = CASE WHEN state IN ('queued', 'running') AND n_done + n_failed + %(d)s + %(f)s < n_items"
        "   AND budget_tokens IS NOT NULL AND tokens + %(t)s >= budget_tokens"
        "   THEN 'budget: ' || (tokens + %(t)s) || ' of ' || budget_tokens || ' tokens spent' ELSE reason END,"
        " finished = CASE WHEN state IN ('queued', 'running') AND n_done + n_failed + %(d)s + %(f)s >= n_items"
        "   THEN now() ELSE finished END"
        " WHERE id = %(job)s RETURNING state",
        {"t": tokens, "d": done, "f": failed, "job": job_id}).fetchone()[0]


def release(conn: psycopg.Connection, job_id: int, sid: int, features: list[int]) -> None:
    """Items a worker claimed but will not finish (the job paused or was cancelled under it): back to queued."""
    conn.execute("UPDATE job_items SET state = 'queued', lease_until = NULL, updated = now() WHERE job_id = %s"
                 " AND sae_id = %s AND feature = ANY(%s) AND state = 'running'", (job_id, sid, features))


def fail_job(conn: psycopg.Connection, job_id: int, reason: str) -> None:
    """A job that no worker can run (its settings do not work on the workers)."""
    conn.execute("UPDATE jobs SET state = 'failed', reason = %s, finished = now(), updated = now() WHERE id = %s"
                 " AND state IN ('queued', 'running')", (reason, job_id))


_LOCK_CLASS = 0x10B5     # advisory lock namespace of the per-job top-up (the second key is the job id)


def top_up(conn: psycopg.Connection, job_id: int, lease_s: float) -> list[Chunk]:
    """Leases the next pending chunks of an active job, as many as keep its window of chunks in flight full;
    returns them for the caller to send. Every finished chunk and the sweeper call this, so the broker holds
    at most `window` messages of a job, and a chunk whose message is lost comes back when its lease expires."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, job_id % (1 << 31)))
        row = conn.execute("SELECT state, params FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None or row[0] not in ACTIVE:
            return []
        in_flight = conn.execute("SELECT count(DISTINCT chunk) FROM job_items WHERE job_id = %s"
                                 " AND lease_until IS NOT NULL", (job_id,)).fetchone()[0]
        want = JobParams(**row[1]).window - in_flight
        if want <= 0:
            return []
        chunks, after = [], -1
        for _ in range(want):   # one index probe per chunk: a DISTINCT over a million items would scan them all
            after = conn.execute("SELECT min(chunk) FROM job_items WHERE job_id = %s AND state = 'queued'"
                                 " AND lease_until IS NULL AND chunk > %s", (job_id, after)).fetchone()[0]
            if after is None:
                break
            chunks.append(after)
        rows = conn.execute(
            "UPDATE job_items SET lease_until = now() + make_interval(secs => %s) WHERE job_id = %s"
            " AND chunk = ANY(%s) AND state = 'queued' AND lease_until IS NULL RETURNING chunk, feature",
            (lease_s, job_id, chunks)).fetchall()
    return _chunks(job_id, rows)


def _chunks(job_id: int, rows) -> list[Chunk]:
    bounds: dict[int, list[int]] = {}
    for chunk, feature in rows:
        b = bounds.setdefault(chunk, [feature, feature])
        b[0], b[1] = min(b[0], feature), max(b[1], feature)
    return [Chunk(job_id, lo, hi) for _, (lo, hi) in sorted(bounds.items())]


def expire_leases(conn: psycopg.Connection, lease_s: float, limit: int = 100_000) -> list[Chunk]:
    """The sweeper: items whose lease expired (their worker died, or the broker lost their message) go back
    to queued. Those of active jobs are leased again and their chunks returned to be sent again; those of
    paused or cancelled jobs stay pending. SKIP LOCKED lets the sweepers of many workers run at once."""
    rows = conn.execute(
        "UPDATE job_items i SET state = 'queued', updated = now(), lease_until = CASE WHEN j.state IN"
        " ('queued', 'running') THEN now() + make_interval(secs => %s) END FROM jobs j"
        " WHERE j.id = i.job_id AND i.ctid = ANY(ARRAY(SELECT ctid FROM job_items WHERE lease_until < now()"
        " AND job_id IN (SELECT id FROM jobs WHERE kind = 'label')"  # harvest shards: expire_shard_leases
        " LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING i.job_id, i.chunk, i.feature, j.state",
        (lease_s, limit)).fetchall()
    out: list[Chunk] = []
    for job_id in sorted({r[0] for r in rows if r[3] in ACTIVE}):
        out += _chunks(job_id, [(r[1], r[2]) for r in rows if r[0] == job_id and r[3] in ACTIVE])
    return out


def active_jobs(conn: psycopg.Connection) -> list[int]:
    """Active labelling jobs (harvest jobs have no chunks to top up)."""
    return [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running') AND kind = 'label'"
                                       " ORDER BY id")]


def cancel(conn: psycopg.Connection, job_id: int) -> str | None:
    """Stops a job: nothing more is claimed; items in a worker finish, the others stay pending. Returns the
    state it left, or None when it had already ended."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE jobs j SET state = 'cancelled', reason = 'cancelled', finished = now(), updated = now()"
            " FROM (SELECT state FROM jobs WHERE id = %s FOR UPDATE) old WHERE j.id = %s"
            " AND j.state IN ('queued', 'running', 'paused') RETURNING old.state", (job_id, job_id)).fetchone()
        conn.execute("UPDATE job_items SET lease_until = NULL WHERE job_id = %s AND state = 'queued'"
                     " AND lease_until IS NOT NULL", (job_id,))
    return None if row is None else row[0]


def resume(conn: psycopg.Connection, job_id: int, budget_tokens: int | None) -> str | None:
    """A paused, cancelled or failed job runs again, with a new budget when one is given; returns the state it
    left, or None when it cannot resume (no such job, or it is queued, running or done)."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE jobs j SET state = 'queued', reason = NULL, finished = NULL, updated = now(),"
            " budget_tokens = coalesce(%s, j.budget_tokens) FROM (SELECT state FROM jobs WHERE id = %s FOR UPDATE)"
            " old WHERE j.id = %s AND j.state IN ('paused', 'cancelled', 'failed') RETURNING old.state",
            (budget_tokens, job_id, job_id)).fetchone()
        conn.execute("UPDATE job_items SET lease_until = NULL WHERE job_id = %s AND state = 'queued'"
                     " AND lease_until IS NOT NULL", (job_id,))
    return None if row is None else row[0]


# a harvest job runs before its SAE has a row: its name is in params
_SUMMARY = ("SELECT j.id, coalesce(s.name, j.params->>'sae'), j.state, j.n_items, j.n_done, j.n_failed, j.tokens,"
            " j.created, j.finished, j.budget_tokens, j.reason, j.params, j.kind"
            " FROM jobs j LEFT JOIN saes s ON s.id = j.sae_id")


def summaries(conn: psycopg.Connection, job_id: int | None = None, limit: int = 50) -> list[JobSummary]:
    """One job, or the latest `limit` jobs newest first, each with its failures counted by reason."""
    if job_id is None:
        rows = conn.execute(_SUMMARY + " ORDER BY j.id DESC LIMIT %s", (limit,)).fetchall()
    else:
        rows = conn.execute(_SUMMARY + " WHERE j.id = %s", (job_id,)).fetchall()
    failures: dict[int, dict[str, int]] = {}
    for jid, reason, n in conn.execute(
            "SELECT job_id, coalesce(reason, 'unknown'), count(*) FROM job_items WHERE job_id = ANY(%s)"
            " AND state = 'failed' GROUP BY 1, 2 ORDER BY 3 DESC", ([r[0] for r in rows],)):
        failures.setdefault(jid, {})[reason] = n
    return [JobSummary(job_id=r[0], sae=r[1], state=r[2], n_items=r[3], n_done=r[4], n_failed=r[5], tokens=r[6],
                       failures=failures.get(r[0], {}), created=r[7], finished=r[8], budget_tokens=r[9],
                       reason=r[10], explainer=r[11].get("explainer"), scorers=r[11].get("scorers", []), kind=r[12])
            for r in rows]


# ---------------------------------------------------------------- harvest jobs (issue 13)
class HarvestJobParams(BaseModel):
    """What a shard's worker needs to run `harvest_to_catalog`; stored in jobs.params."""
    sae: str                        # the catalog name it will have
    sae_path: str                   # absolute: every worker reads the SAE from there
    corpus: str
    tokens: int
    cfg: dict                       # sae.configs.HarvestConfig's fields
    replace: bool = False
    device: str = "auto"
    batch_size: int = 16
    queue: str = "harvest"          # where the sweeper sends a shard again
    state_dir: str                  # the shards' partial states, under settings.harvest_state_root


@dataclass
class ShardRef:
    """A shard task to send: job job_id's shard `shard` on `queue`."""
    job_id: int
    shard: int
    queue: str


def create_harvest_job(conn: psycopg.Connection, params: HarvestJobParams, n_shards: int, lease_s: float) -> int:
    """The job and one item per shard, leased as they go to the broker (a lost message comes back when its lease
    expires); the state folder is named after the job, so params are completed here. Returns the job id."""
    with conn.transaction():
        job_id = conn.execute("INSERT INTO jobs (kind, params, n_items, n_chunks, chunk_size)"
                              " VALUES ('harvest', '{}', %s, %s, 1) RETURNING id", (n_shards, n_shards)).fetchone()[0]
        params.state_dir = f"{params.state_dir.rstrip('/')}/job-{job_id}"
        conn.execute("UPDATE jobs SET params = %s WHERE id = %s", (Jsonb(params.model_dump()), job_id))
        conn.execute("INSERT INTO job_items (job_id, sae_id, feature, chunk, lease_until)"
                     " SELECT %s, 0, i, i, now() + make_interval(secs => %s) FROM generate_series(0, %s - 1) i",
                     (job_id, lease_s, n_shards))
    return job_id


@dataclass
class HarvestJobRef:
    """What a shard's worker reads of its job before claiming."""
    state: str
    n_shards: int
    params: HarvestJobParams


def harvest_job(conn: psycopg.Connection, job_id: int) -> HarvestJobRef | None:
    row = conn.execute("SELECT state, n_items, params FROM jobs WHERE id = %s AND kind = 'harvest'",
                       (job_id,)).fetchone()
    return None if row is None else HarvestJobRef(row[0], row[1], HarvestJobParams(**row[2]))


def claim_shard(conn: psycopg.Connection, job_id: int, shard: int, lease_s: float) -> bool:
    """Leases a queued shard of an active job; False when it is running elsewhere, done, or the job stopped
    (a duplicate or late message then does nothing). The job turns running."""
    with conn.transaction():
        got = conn.execute(
            "UPDATE job_items SET state = 'running', lease_until = now() + make_interval(secs => %s),"
            " attempts = attempts + 1, updated = now() WHERE job_id = %s AND sae_id = 0 AND feature = %s"
            " AND state = 'queued' AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = %s AND j.state IN"
            " ('queued', 'running'))", (lease_s, job_id, shard, job_id)).rowcount
        if got:
            conn.execute("UPDATE jobs SET state = 'running', updated = now() WHERE id = %s AND state = 'queued'",
                         (job_id,))
    return bool(got)


def finish_shard(conn: psycopg.Connection, job_id: int, shard: int, merged: bool) -> str:
    """The shard's item done; the job done when this shard merged the set (it wrote the catalog). A repeated
    write counts nothing twice. Returns the job's state."""
    with conn.transaction():
        moved = conn.execute(
            "UPDATE job_items SET state = 'done', lease_until = NULL, updated = now() WHERE job_id = %s"
            " AND sae_id = 0 AND feature = %s AND state IN ('queued', 'running')", (job_id, shard)).rowcount
        return conn.execute(
            "UPDATE jobs SET n_done = n_done + %s, updated = now(),"
            " state = CASE WHEN %s AND state IN ('queued', 'running') THEN 'done' ELSE state END,"
            " finished = CASE WHEN %s AND state IN ('queued', 'running') THEN now() ELSE finished END"
            " WHERE id = %s RETURNING state", (moved, merged, merged, job_id)).fetchone()[0]


def expire_shard_leases(conn: psycopg.Connection, lease_s: float) -> list[ShardRef]:
    """The sweeper's harvest half: shards whose lease expired (their worker died, or the broker lost their
    message) go back to queued; those of active jobs are leased again and returned to be sent again."""
    rows = conn.execute(
        "UPDATE job_items i SET state = 'queued', updated = now(), lease_until = CASE WHEN j.state IN"
        " ('queued', 'running') THEN now() + make_interval(secs => %s) END FROM jobs j"
        " WHERE j.id = i.job_id AND i.ctid = ANY(ARRAY(SELECT ctid FROM job_items WHERE lease_until < now()"
        " AND job_id IN (SELECT id FROM jobs WHERE kind = 'harvest') FOR UPDATE SKIP LOCKED))"
        " RETURNING i.job_id, i.feature, j.state, j.params->>'queue'", (lease_s,)).fetchall()
    return [ShardRef(r[0], r[1], r[3]) for r in sorted(rows) if r[2] in ACTIVE]
