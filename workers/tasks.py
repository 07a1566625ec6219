"""The workers' tasks, thin: the job logic is interp.labelling's.

- `label_chunk(job_id, first, last)`: label and score one chunk of a job's features, then send its next chunks.
- `harvest_shard(job_id, shard)`: harvest one shard of a harvest job; the last one merges (interp.harvest_queue).
- the sweeper: a thread in every live worker's main process that returns expired leases to the queue (see
  interp.labelling.sweep), so a job never waits on the broker to redeliver what a dead worker held.
"""
from __future__ import annotations

import logging
import random
import threading
from functools import partial

from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown

from interp import harvest_queue, labelling
from interp.settings import get_settings

from .app import app

log = logging.getLogger(__name__)
for _name in ("httpx", "httpx2"):     # a line per LLM call costs CPU a worker needs for calls
    logging.getLogger(_name).setLevel(logging.WARNING)
_stop = threading.Event()


@app.task(name=labelling.TASK)
def label_chunk(job_id: int, first: int, last: int) -> None:
    n = labelling.run_chunk(job_id, first, last, partial(labelling.send_chunks, app))
    log.info("job %d: chunk %d..%d stored %d features", job_id, first, last, n)


@app.task(name=harvest_queue.TASK)
def harvest_shard(job_id: int, shard: int) -> None:
    state = harvest_queue.run_shard(job_id, shard)
    log.info("harvest job %d: shard %d ran; the job is %s", job_id, shard, state or "not ours to run")


def _sweep_forever() -> None:
    period = get_settings().job_sweep_s
    while not _stop.wait(period * random.uniform(0.8, 1.2)):  # jitter: the fleet's sweepers spread apart
        try:
            sent = labelling.sweep(partial(labelling.send_chunks, app))
            shards = harvest_queue.sweep(app)
            if sent or shards:
                log.info("sweeper: sent %d chunks and %d harvest shards again", sent, shards)
        except Exception:  # noqa: BLE001 - the sweeper must outlive a database or broker outage
            log.exception("sweeper pass failed; next in %.0fs", period)


@worker_ready.connect
def _start_sweeper(**_) -> None:
    threading.Thread(target=_sweep_forever, name="lease-sweeper", daemon=True).start()


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    _stop.set()
    labelling.close_loop()      # the solo pool's chunks ran in this process


@worker_process_shutdown.connect
def _close_loop(**_) -> None:
    labelling.close_loop()      # a prefork child's
