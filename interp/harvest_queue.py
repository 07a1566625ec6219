"""Harvest shards as Celery tasks: `interp harvest --shards N --queue Q` queues a harvest job of N shard items and
sends one task per shard; a worker runs its shard with `harvest_to_catalog(shard="i/N")`, the states meeting under
settings.harvest_state_root, and the shard that completes the set merges them into the catalog (the job is then
done). A shard's item holds a lease renewed while it runs, so a shard whose worker died is sent again by the
sweeper (`sweep`) within a lease, not after the broker's visibility timeout, and redone."""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import psycopg

from interp.labelling import check_broker, with_db
from interp.settings import get_settings
from interp.store import jobs
from interp.store.jobs import HarvestJobParams, JobSummary, ShardRef
from interp.store.saes import name_taken, sae_id
from sae.configs import HarvestConfig
from sae.errors import InputError

log = logging.getLogger(__name__)
TASK = "workers.tasks.harvest_shard"


def send_shards(app, shards: list[ShardRef]) -> None:
    """Sends shard tasks by name. A failed send is logged, not raised: the shard's lease brings it back."""
    for r in shards:
        try:
            app.send_task(TASK, args=(r.job_id, r.shard), queue=r.queue,
                          retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as e:  # noqa: BLE001 - any broker failure: the lease brings the shard back
            log.warning("job %d: could not send shard %d (%s); its lease will bring it back", r.job_id, r.shard,
                        str(e)[:200])


def queue_harvest(conn: psycopg.Connection, app, sae_path: str, name: str, corpus: str, tokens: int, *,
                  cfg: HarvestConfig, shards: int, queue: str | None = None, replace: bool = False,
                  device: str = "auto", batch_size: int = 16) -> JobSummary:
    """Checks what can be checked here, creates the job and sends its shard tasks; returns its summary."""
    from interp.db import migrate
    from sae.formats import read_cfg

    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    read_cfg(sae_path)      # an SAE folder that is not one fails here, not in every worker
    migrate(conn)
    if sae_id(conn, name) is not None and not replace:
        raise name_taken(name)
    check_broker(app)
    hs = get_settings()
    params = HarvestJobParams(sae=name, sae_path=str(Path(sae_path).resolve()), corpus=corpus, tokens=tokens,
                              cfg=dataclasses.asdict(cfg), replace=replace, device=device, batch_size=batch_size,
                              queue=queue or hs.harvest_queue, state_dir=hs.harvest_state_root)
    lease_s = get_settings().job_lease_s
    job_id = jobs.create_harvest_job(conn, params, shards, lease_s)
    send_shards(app, [ShardRef(job_id, i, params.queue) for i in range(shards)])
    return jobs.summaries(conn, job_id)[0]


def _renew_until(stop: threading.Event, job_id: int, shard: int) -> None:
    lease_s = get_settings().job_lease_s
    while not stop.wait(lease_s / 3):
        try:
            with_db(jobs.renew, job_id, 0, [shard], lease_s)
        except psycopg.OperationalError as e:
            log.warning("job %d: shard %d lease not renewed (%s)", job_id, shard, str(e)[:120])


def run_shard(job_id: int, shard: int) -> str | None:
    """One task: claim the shard, harvest it (lease renewed meanwhile), record it. Returns the job's state
    after it, or None when this message had nothing to do (a duplicate, or the job stopped)."""
    from interp.harvest_job import harvest_to_catalog

    job = with_db(jobs.harvest_job, job_id)
    if job is None or job.state not in jobs.ACTIVE:
        return None
    if not with_db(jobs.claim_shard, job_id, shard, get_settings().job_lease_s):
        return None
    p = job.params
    if not p.replace and with_db(sae_id, p.sae) is not None:
        # the name was free when the job was queued: the set was merged, by a shard killed before it said so
        return with_db(jobs.finish_shard, job_id, shard, True)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(stop, job_id, shard), daemon=True)
    renewer.start()
    try:
        out = harvest_to_catalog(p.sae_path, p.sae, p.corpus, p.tokens, cfg=HarvestConfig(**p.cfg),
                                 shard=f"{shard}/{job.n_shards}", replace=p.replace, device=p.device, batch_size=p.batch_size,
                                 state_dir=p.state_dir, progress=False)
    except InputError as e:     # what no worker can run (the SAE is not where the job says, a name now taken)
        with_db(jobs.fail_job, job_id, str(e))
        return "failed"
    finally:
        stop.set()
        renewer.join()
    return with_db(jobs.finish_shard, job_id, shard, "merged_by" not in out and "waiting_for" not in out)


def sweep(app) -> int:
    """Every live worker, on a timer: harvest shards whose lease expired are sent again. Returns how many."""
    shards = with_db(jobs.expire_shard_leases, get_settings().job_lease_s)
    send_shards(app, shards)
    return len(shards)
