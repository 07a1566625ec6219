"""Harvest shards as Celery tasks, against real Redis, Postgres and worker processes: a worker killed with
kill -9 (its whole process group) in the middle of its shard loses nothing. The shard's lease expires, a live
worker's sweeper sends it again, another worker redoes it and the shard that completes the set merges: the
catalog equals the unsharded harvest's."""
import json
import os
import uuid

import pytest

from interp.harvest_job import harvest_to_catalog
from interp.settings import get_settings
from sae.configs import HarvestConfig
from tests.helpers import URL, catalog_rows, harvest_args
from tests.jobs_support import kill_group, start_worker, wait_for, worker_env

REDIS = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/7")
TOKENS = 1024
pytestmark = pytest.mark.slow


def _items(conn, job_id):
    return conn.execute("SELECT feature, state, attempts FROM job_items WHERE job_id = %s ORDER BY feature",
                        (job_id,)).fetchall()


def test_a_shard_whose_worker_is_killed_is_redone_and_the_merge_equals_the_unsharded_harvest(
        conn, names, sae_dir, tmp_path, cli, monkeypatch):
    whole, sharded = names(), names()
    harvest_to_catalog(sae_dir, whole, "builtin", TOKENS, cfg=HarvestConfig(top_k=10, window=16, ctx_len=32),
                       batch_size=8, device="cpu", progress=False, url=URL)
    queue, root = f"harvest-{uuid.uuid4().hex[:8]}", tmp_path / "states"
    values = {"database_url": URL, "celery_broker_url": REDIS, "redis_url": REDIS, "job_queue": queue,
              "job_lease_s": 5, "job_sweep_s": 1, "harvest_state_root": str(root), "harvest_queue": queue}
    env = worker_env(**values)
    for k, v in values.items():
        monkeypatch.setenv(k.upper(), str(v))
    get_settings.cache_clear()
    workers, job_id = [start_worker(env, concurrency=1, log=tmp_path / f"w{i}.log") for i in range(2)], None
    try:
        r = cli(*harvest_args(sae_dir, sharded, "--shards", "2", "--queue", queue, "--device", "cpu", "--json",
                              tokens=TOKENS))
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        job_id = job["job_id"]
        assert (job["sae"], job["kind"], job["n_items"], job["n_done"]) == (sharded, "harvest", 2, 0)
        # each worker runs one message at a time, so with both shards running the first worker holds one
        wait_for(lambda: [s for _, s, _ in _items(conn, job_id)] == ["running", "running"], 120,
                 what="both shards running")
        kill_group(workers[0])
        assert conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()[0] == "running"
        workers.append(start_worker(env, concurrency=1, log=tmp_path / "w2.log"))
        wait_for(lambda: conn.execute("SELECT state NOT IN ('queued', 'running') FROM jobs WHERE id = %s",
                                      (job_id,)).fetchone()[0], 150, what="the job to end")
    finally:
        for w in workers:
            kill_group(w)
        get_settings.cache_clear()
    r = cli("jobs", str(job_id), "--json")
    shown = json.loads(r.stdout)
    assert (shown["state"], shown["kind"], shown["sae"], shown["n_done"], shown["n_failed"]) == \
        ("done", "harvest", sharded, 2, 0), shown
    # the killed worker's shard was claimed a second time; the other ran once
    assert sorted(a for _, _, a in _items(conn, job_id)) == [1, 2]
    assert catalog_rows(conn, sharded) == catalog_rows(conn, whole)
    assert not any(root.rglob("*.pt"))      # the merge removed every shard's state
    listed = cli("jobs")
    assert f"job {job_id} [done] harvest {sharded}: 2 of 2 shards done" in listed.stdout
    conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))


def test_a_shard_redone_after_its_merge_was_written_ends_the_job_without_harvesting(conn, names, monkeypatch):
    from interp.harvest_queue import run_shard
    from interp.store.jobs import HarvestJobParams, create_harvest_job
    from tests.jobs_support import make_sae

    monkeypatch.setenv("DATABASE_URL", URL)
    name = make_sae(conn, 4)        # the catalog row the merging shard wrote before its worker died
    params = HarvestJobParams(sae=name, sae_path="/nonexistent", corpus="builtin", tokens=64, cfg={},
                              state_dir="/nonexistent")
    job_id = create_harvest_job(conn, params, 2, 5.0)
    try:
        assert run_shard(job_id, 1) == "done"
        assert run_shard(job_id, 1) is None         # a duplicate message finds the job ended
        assert _items(conn, job_id) == [(0, "queued", 0), (1, "done", 1)]
    finally:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))


@pytest.mark.parametrize("extra, says", [(("--shards", "0"), "--shards must be at least 1"),
                                         (("--queue", "harvest"), "--queue needs --shards N"),
                                         (("--shards", "2", "--shard", "0/2"), "--shards takes neither")])
def test_bad_shard_options_are_one_line(cli, sae_dir, names, extra, says):
    r = cli(*harvest_args(sae_dir, names(), *extra))
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
