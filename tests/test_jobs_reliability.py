"""The labelling job's reliability, end to end: real worker processes (`celery -A workers.app worker`), the real
Postgres, Redis and RabbitMQ, and the OpenAI-compatible stub over HTTP. A worker killed with kill -9 (its whole
process group), a flaky LLM, a Postgres restart and a Redis restart mid-job; cancel, budget and resume.

Services are restarted briefly and always started again in a `finally`."""
import json
import os
import random
import subprocess
import sys
import time
import uuid

import pytest

from interp.db import connect
from interp.labelling import LabelRequest, broker_app, queue_job, resume_job
from interp.settings import get_settings
from interp.store import jobs
from tests.helpers import URL
from tests.jobs_support import kill_group, make_sae, oracle, start_worker, stop_worker, wait_for, worker_env
from tests.stub_llm import StubLLM

REDIS = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/5")
RABBIT = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
FAULTS = ("429", "500", "503", "timeout", "malformed")
PG_RESTART = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main {}"
REDIS_START = ("redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no "
               "--dir /var/lib/redis --logfile /var/log/redis/ci.log")
pytestmark = pytest.mark.slow


class FlakyStub(StubLLM):
    """The stub, answering `fault_rate` of the calls with a random fault."""
    fault_rate = 0.0

    def _next_fault(self):
        queued = super()._next_fault()
        if queued is None and self.fault_rate and random.random() < self.fault_rate:
            return random.choice(FAULTS)
        return queued


@pytest.fixture(scope="module")
def stub():
    with FlakyStub(latency_s=0.02, stall_s=1.0, retry_after="0.1") as s:
        s.responder = oracle
        yield s


@pytest.fixture(scope="module")
def sae(conn):
    name = make_sae(conn, 500)
    yield name
    with connect(URL) as c:       # the module's connection does not survive the Postgres restart
        c.execute("DELETE FROM saes WHERE name = %s", (name,))


def settings_for(stub, broker: str) -> dict:
    return {"database_url": URL, "celery_broker_url": broker, "redis_url": REDIS, "openai_base_url": stub.url,
            "openai_api_key": "sk-test", "job_queue": f"test-{uuid.uuid4().hex[:8]}", "job_chunk_size": 25,
            "job_window": 4, "job_lease_s": 4, "job_sweep_s": 1, "llm_concurrency": 16, "llm_max_retries": 2,
            "llm_timeout_s": 0.5}


@pytest.fixture
def as_settings(monkeypatch):
    """This process's settings = the workers' (queue_job sends to their queue)."""
    def apply(values: dict) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k.upper(), str(v))
        get_settings.cache_clear()
    yield apply
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def redis_worker(stub, tmp_path_factory):
    """One worker on the Redis broker, shared by the tests that do not kill workers."""
    values = settings_for(stub, REDIS)
    w = start_worker(worker_env(**values), log=tmp_path_factory.mktemp("w") / "redis-worker.log", via_cli=True)
    yield values
    stop_worker(w)
    import redis

    redis.Redis.from_url(REDIS).delete(values["job_queue"])    # duplicates the sweeper sent, now never run


def unlabel(conn, sae) -> None:
    """Each test labels from scratch (a rerun over labelled features would have nothing to do)."""
    conn.execute("DELETE FROM explanations WHERE sae_id = (SELECT id FROM saes WHERE name = %s)", (sae,))


def label(conn, sae, features, **kw):
    return queue_job(conn, LabelRequest(sae=sae, features=features, explainer="openai:stub", scorers=("detection",),
                                        **kw), broker_app())


def job(conn, job_id):
    return jobs.summaries(conn, job_id)[0]


def ended(conn, job_id):
    j = job(conn, job_id)
    return j if j.state not in jobs.ACTIVE else None


def assert_exactly_once(conn, sae, lo, hi):
    """Every feature in lo..hi-1 has one label of this explainer and one detection score, no more."""
    rows = conn.execute(
        "SELECT e.feature, count(DISTINCT e.id), count(s.id) FROM explanations e JOIN saes a ON a.id = e.sae_id"
        " LEFT JOIN scores s ON s.explanation_id = e.id WHERE a.name = %s AND e.explainer = 'openai:stub'"
        " AND e.feature >= %s AND e.feature < %s GROUP BY 1 ORDER BY 1", (sae, lo, hi)).fetchall()
    assert [r[0] for r in rows] == list(range(lo, hi))
    assert {(r[1], r[2]) for r in rows} == {(1, 1)}


def running(conn, job_id) -> list[int]:
    return [r[0] for r in conn.execute("SELECT feature FROM job_items WHERE job_id = %s AND state = 'running'",
                                       (job_id,))]


def test_kill_9_a_whole_worker_mid_job_then_a_new_worker_finishes_it(conn, sae, stub, as_settings, tmp_path):
    values = settings_for(stub, RABBIT)
    as_settings(values)
    env = worker_env(**values)
    stub.latency_s = 0.1            # chunks long enough that the kill lands inside one
    first = start_worker(env, log=tmp_path / "w1.log")
    try:
        unlabel(conn, sae)
        j = label(conn, sae, "0:500")
        wait_for(lambda: job(conn, j.job_id).n_done >= 100 and running(conn, j.job_id), 90,
                 what="100 features done and a chunk in a worker")
        kill_group(first)
        in_flight = running(conn, j.job_id)       # exact: nothing alive can change them now
        at_kill = job(conn, j.job_id)
        assert in_flight and at_kill.state == "running" and at_kill.n_done < 500
        t = time.monotonic()
        second = start_worker(env, log=tmp_path / "w2.log")
        try:
            final = wait_for(lambda: ended(conn, j.job_id), 120, what="the job to end after a new worker started")
        finally:
            stop_worker(second)
        assert time.monotonic() - t < 120
    finally:
        stub.latency_s = 0.02
        kill_group(first)
        with broker_app().connection_for_write() as c:
            c.default_channel.queue_delete(values["job_queue"])
    assert (final.state, final.n_done, final.n_failed) == ("done", 500, 0)
    assert_exactly_once(conn, sae, 0, 500)
    # the items the killed worker held came back through their leases and were claimed a second time
    again = conn.execute("SELECT count(*) FROM job_items WHERE job_id = %s AND feature = ANY(%s) AND attempts > 1",
                         (j.job_id, in_flight)).fetchone()[0]
    assert again == len(in_flight)


def test_a_flaky_llm_job_completes_with_failures_counted_by_reason(conn, sae, stub, redis_worker, as_settings):
    as_settings(redis_worker)
    stub.fault_rate = 0.3
    try:
        unlabel(conn, sae)
        r = subprocess.run([sys.executable, "-m", "interp.cli", "label", "--sae", sae, "--features", "0:200",
                            "--explainer", "openai:stub", "--scorer", "detection", "--wait", "--json"],
                           env=worker_env(**redis_worker), capture_output=True, text=True, timeout=150)
    finally:
        stub.fault_rate = 0.0
    assert r.returncode == 0, r.stderr[-2000:]
    assert "200/200" in r.stderr and "feat/s" in r.stderr      # the --wait progress bar
    final = jobs.JobSummary(**json.loads(r.stdout))
    assert final == job(conn, final.job_id)
    assert final.state == "done" and final.n_done + final.n_failed == final.n_items == 200
    assert final.n_failed > 0 and sum(final.failures.values()) == final.n_failed
    assert set(final.failures) <= {"rate_limited", "server_error", "timeout", "malformed", "connection",
                                   "unparseable"}, final.failures
    items = conn.execute("SELECT count(*) FILTER (WHERE state = 'failed' AND reason IS NOT NULL AND error IS NOT NULL),"
                         " count(*) FILTER (WHERE state = 'done') FROM job_items WHERE job_id = %s",
                         (final.job_id,)).fetchone()
    assert items == (final.n_failed, final.n_done)
    # a feature that failed has its failure stored with its explanation or its score
    failed_rows = conn.execute(
        "SELECT count(*) FROM job_items i JOIN explanations e ON e.sae_id = i.sae_id AND e.feature = i.feature"
        " AND e.explainer = 'openai:stub' LEFT JOIN scores s ON s.explanation_id = e.id WHERE i.job_id = %s"
        " AND i.state = 'failed' AND (e.failure IS NOT NULL OR s.failure IS NOT NULL)", (final.job_id,)).fetchone()[0]
    assert failed_rows == final.n_failed


def restart(cmd: str, start: str) -> None:
    try:
        subprocess.run(cmd, shell=True, check=True, timeout=60, capture_output=True)
    finally:
        subprocess.run(start, shell=True, timeout=60, capture_output=True)   # whatever happened, it runs again


def test_postgres_restart_mid_job_loses_nothing(conn, sae, stub, redis_worker, as_settings):
    as_settings(redis_worker)
    stub.latency_s = 0.05
    try:
        unlabel(conn, sae)
        j = label(conn, sae, "200:500")
        wait_for(lambda: job(conn, j.job_id).n_done >= 50, 90, what="50 features done")
        assert job(conn, j.job_id).n_done < 250         # the restart comes mid-job
        restart(PG_RESTART.format("restart"), PG_RESTART.format("start"))
    finally:
        stub.latency_s = 0.02
    fresh = wait_for(lambda: _reconnect(), 30, what="Postgres back")
    try:
        final = wait_for(lambda: ended(fresh, j.job_id), 120, what="the job to end after the restart")
        assert (final.state, final.n_done, final.n_failed) == ("done", 300, 0)
        assert_exactly_once(fresh, sae, 200, 500)
    finally:
        fresh.close()


def _reconnect():
    try:
        return connect(URL)
    except Exception:  # noqa: BLE001 - still starting
        return None


def test_redis_restart_mid_job_leases_cover_what_the_broker_lost(sae, stub, redis_worker, as_settings):
    as_settings(redis_worker)
    c = wait_for(_reconnect, 30, what="Postgres")   # the module's connection may predate the Postgres restart
    stub.latency_s = 0.05
    try:
        unlabel(c, sae)
        j = label(c, sae, "0:300")
        wait_for(lambda: job(c, j.job_id).n_done >= 50, 90, what="50 features done")
        assert job(c, j.job_id).n_done < 250
        restart("redis-cli -p 6379 shutdown nosave", REDIS_START)
        stub.latency_s = 0.02
        final = wait_for(lambda: ended(c, j.job_id), 120, what="the job to end after the broker restart")
        assert (final.state, final.n_done, final.n_failed) == ("done", 300, 0)
        assert_exactly_once(c, sae, 0, 300)
    finally:
        stub.latency_s = 0.02
        c.close()


def test_cancel_budget_stop_and_resume(sae, stub, redis_worker, as_settings):
    as_settings(redis_worker)
    c = wait_for(_reconnect, 30, what="Postgres")
    try:
        unlabel(c, sae)
        per_feature = 700       # about: the oracle's prompts are ~230 tokens x 3 calls
        j = label(c, sae, "0:200", budget_tokens=40 * per_feature)
        wait_for(lambda: ended(c, j.job_id), 90, what="the budget stop")
        paused = wait_for(lambda: _settled(c, j.job_id), 30, what="in-flight items to finish")
        assert paused.state == "paused" and paused.reason.startswith("budget")
        assert paused.tokens >= paused.budget_tokens and 0 < paused.n_done < 200 and paused.n_failed == 0
        time.sleep(2)        # chunks in the broker or in flight find the job paused and claim nothing more
        assert job(c, j.job_id).n_done == paused.n_done
        pending = c.execute("SELECT count(*) FROM job_items WHERE job_id = %s AND state = 'queued'",
                            (j.job_id,)).fetchone()[0]
        assert pending == 200 - paused.n_done           # the rest stay pending, not failed

        resumed = resume_job(c, j.job_id, 10**9, broker_app())
        assert resumed.state in jobs.ACTIVE
        wait_for(lambda: job(c, j.job_id).n_done >= paused.n_done + 25, 60, what="progress after resume")
        assert jobs.cancel(c, j.job_id) in jobs.ACTIVE
        cancelled = wait_for(lambda: _settled(c, j.job_id), 30, what="in-flight items to finish")
        assert cancelled.state == "cancelled" and cancelled.n_done < 200
        resume_job(c, j.job_id, None, broker_app())
        final = wait_for(lambda: ended(c, j.job_id), 90, what="the resumed job to end")
        assert (final.state, final.n_done, final.n_failed) == ("done", 200, 0)
        assert_exactly_once(c, sae, 0, 200)
    finally:
        c.close()


def _settled(c, job_id):
    """The job once none of its items is running any more (a cancel lets in-flight items finish)."""
    running = c.execute("SELECT count(*) FROM job_items WHERE job_id = %s AND state = 'running'",
                        (job_id,)).fetchone()[0]
    return job(c, job_id) if running == 0 else None
