"""`interp label` / `interp jobs` against the real Postgres, Redis and the HTTP stub LLM, chunks run in this
process (no worker): bad input writes no row, reruns do only what is missing, summaries and cancel."""
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from interp.labelling import LabelRequest, broker_app, explainer_version, failure_reason, queue_job, run_chunk
from interp.settings import get_settings
from interp.store import jobs
from tests.helpers import URL
from tests.jobs_support import make_sae, oracle
from tests.stub_llm import StubLLM

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/5")
QUEUE = f"test-cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as s:
        s.responder = oracle
        yield s


@pytest.fixture
def env(stub, monkeypatch):
    vals = {"DATABASE_URL": URL, "CELERY_BROKER_URL": BROKER, "REDIS_URL": BROKER, "OPENAI_BASE_URL": stub.url,
            "OPENAI_API_KEY": "sk-test", "JOB_QUEUE": QUEUE, "JOB_CHUNK_SIZE": "10", "JOB_WINDOW": "2"}
    for k, v in vals.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield vals
    get_settings.cache_clear()
    app = broker_app()
    with app.connection_for_write() as c:
        c.default_channel.queue_delete(QUEUE)


@pytest.fixture(scope="module")
def sae(conn):
    name = make_sae(conn, 30)
    yield name
    conn.execute("DELETE FROM saes WHERE name = %s", (name,))


def n_jobs(conn) -> int:
    return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


@pytest.fixture
def interp(capsys, monkeypatch):
    """`interp ARGS` through the CLI's own main() in this process, under `env`: (exit code, stdout, stderr)."""
    from interp.cli import main

    def run(*args, env):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            m.setattr(sys, "argv", ["interp", *args])
            get_settings.cache_clear()
            code = 0
            try:
                main()
            except SystemExit as e:
                code = e.code or 0
        get_settings.cache_clear()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


BAD = [
    (["--sae", "no_such_sae", "--features", "0:5"], {}, "no SAE named 'no_such_sae'"),
    (["--features", "0:31"], {}, "out of bounds: SAE .* has features 0..29"),
    (["--features", "5:2"], {}, "out of bounds"),
    (["--features", "a:b"], {}, "is not a range A:B"),
    (["--features", "0:5", "--explainer", "gpt4"], {}, "unknown LLM spec 'gpt4'"),
    (["--features", "0:5", "--explainer", "openai:m", "--simulator", "nope:x", "--scorer", "detection"], {},
     "unknown LLM spec 'nope:x'"),
    (["--features", "0:5", "--scorer", "embedding,vibes"], {}, "unknown scorer 'vibes'"),
    (["--features", "0:5", "--scorer", "detection"], {}, "need an LLM simulator"),
    (["--features", "0:5", "--window", "0"], {}, "--window must be a positive number"),
    (["--features", "0:5", "--budget-tokens", "-3"], {}, "--budget-tokens must be a positive number"),
    (["--features", "0:5", "--explainer", "openai:m", "--check-endpoint"],
     {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
     "cannot reach the LLM endpoint of openai:m at http://127.0.0.1:9/v1"),
    (["--features", "0:5"], {"CELERY_BROKER_URL": "redis://:hunter2@127.0.0.1:9/0"},
     r"cannot reach the broker at redis://:\*\*\*@127.0.0.1:9/0"),
    (["--features", "0:5"], {"DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:9/x"},
     r"cannot reach the database at postgresql://u:\*\*\*@127.0.0.1:9/x"),
]


@pytest.mark.parametrize("args,extra,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_no_job_row(conn, sae, env, interp, args, extra, message):
    import re

    before = n_jobs(conn)
    full = ["label"] + (args if args[0] == "--sae" else ["--sae", sae, *args])
    r = interp(*full, env={**env, **extra})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), r.stderr
    assert "hunter2" not in r.stderr
    assert n_jobs(conn) == before


def run_all(job_id: int, first: int, last: int) -> int:
    sent = []
    return run_chunk(job_id, first, last, sent.extend)


def test_job_labels_scores_and_a_rerun_does_only_what_is_missing(conn, sae, env, stub):
    req = LabelRequest(sae=sae, features="0:30", explainer="openai:stub", scorers=("detection",))
    job = queue_job(conn, req, broker_app())
    assert (job.state, job.n_items) == ("queued", 30)
    calls = len(stub.requests)
    assert run_all(job.job_id, 0, 29) == 30
    assert len(stub.requests) - calls == 30 * 3        # one explain call and two detection batches per feature
    assert run_all(job.job_id, 0, 29) == 0             # a redelivered chunk finds nothing to claim
    done = jobs.summaries(conn, job.job_id)[0]
    assert (done.state, done.n_done, done.n_failed, done.failures) == ("done", 30, 0, {})
    assert done.finished is not None and done.tokens > 0
    labels = conn.execute("SELECT e.feature, e.label, s.value FROM explanations e JOIN scores s ON s.explanation_id"
                          " = e.id JOIN saes a ON a.id = e.sae_id WHERE a.name = %s ORDER BY 1", (sae,)).fetchall()
    assert [r[0] for r in labels] == list(range(30))
    assert labels[7][1] == "the token #1007" and labels[7][2] == 1.0   # the oracle detector is perfect

    again = queue_job(conn, req, broker_app())           # the same settings: nothing is missing
    assert (again.state, again.n_items) == ("done", 0)
    partial = queue_job(conn, LabelRequest(sae=sae, features="25:30", explainer="openai:other",
                                           simulator="openai:stub", scorers=("detection",)), broker_app())
    assert partial.n_items == 5                         # a new explainer model labels again ...
    run_all(partial.job_id, 25, 29)
    n = conn.execute("SELECT count(*) FROM explanations e JOIN saes a ON a.id = e.sae_id WHERE a.name = %s"
                     " AND e.feature >= 25", (sae,)).fetchone()[0]
    assert n == 10                                      # ... and keeps the old labels


def test_jobs_json_shape_cancel_and_resume_through_the_cli(conn, sae, env, interp):
    import json

    r = interp("label", "--sae", sae, "--features", "0:30", "--explainer", "openai:stub", "--simulator",
               "openai:stub2", "--scorer", "detection", "--json", env=env)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    keys = {"job_id", "sae", "state", "n_items", "n_done", "n_failed", "tokens", "failures", "created", "finished"}
    assert keys <= set(job) and job["state"] == "queued" and job["n_items"] == 30
    run_all(job["job_id"], 0, 9)
    r = interp("jobs", "cancel", str(job["job_id"]), "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "cancelled"
    assert run_all(job["job_id"], 10, 19) == 0          # a cancelled job's chunks claim nothing
    shown = json.loads(interp("jobs", str(job["job_id"]), "--json", env=env).stdout)
    assert (shown["state"], shown["n_done"], shown["n_items"]) == ("cancelled", 10, 30)
    assert job["job_id"] in [j["job_id"] for j in json.loads(interp("jobs", "--json", env=env).stdout)["jobs"]]
    r = interp("jobs", "cancel", str(job["job_id"]), env=env)
    assert r.returncode == 2 and "cancelled already" in r.stderr
    r = interp("label", "--resume", str(job["job_id"]), "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "queued"
    for a in (10, 20):
        run_all(job["job_id"], a, a + 9)
    final = jobs.summaries(conn, job["job_id"])[0]
    assert (final.state, final.n_done) == ("done", 30)


@pytest.mark.parametrize("line,reason", [
    ("error: HTTP 500 from openai:m at http://x, gave up after 3 attempts", "server_error"),
    ("error: timeout after 0.5s from openai:m", "timeout"),
    ("unparseable: 'blah'", "unparseable"),
    ("scoring: 2/2 batches failed: error: HTTP 429 from openai:m", "rate_limited"),
    ("refusal", "refusal"),
    ("something new", "error"),
])
def test_failure_reasons_are_counted_by_category(line, reason):
    assert failure_reason(line) == reason


def test_a_job_no_worker_can_run_fails_with_the_reason_and_keeps_its_items_pending(conn, sae, env, monkeypatch):
    job = queue_job(conn, LabelRequest(sae=sae, features="0:10", explainer="openai:elsewhere",
                                       scorers=("detection",)), broker_app())
    monkeypatch.delenv("OPENAI_BASE_URL")           # this worker has no endpoint for the job's model
    monkeypatch.setenv("OPENAI_API_KEY", "")
    get_settings.cache_clear()
    assert run_all(job.job_id, 0, 9) == 0
    failed = jobs.summaries(conn, job.job_id)[0]
    assert failed.state == "failed" and "OPENAI_API_KEY" in failed.reason and failed.n_done == 0
    states = conn.execute("SELECT state, count(*) FROM job_items WHERE job_id = %s GROUP BY 1",
                          (job.job_id,)).fetchall()
    assert states == [("queued", 10)]


def test_a_list_of_features_is_labelled_once_each_and_checked_against_the_sae(conn, sae, env):
    from sae.errors import InputError

    req = LabelRequest(sae=sae, indices=(29, 3, 5, 5), explainer="openai:listed", simulator="openai:stub",
                       scorers=("detection",))
    job = queue_job(conn, req, broker_app())
    assert job.n_items == 3
    assert [r[0] for r in conn.execute("SELECT feature FROM job_items WHERE job_id = %s ORDER BY 1",
                                       (job.job_id,))] == [3, 5, 29]
    before = n_jobs(conn)
    with pytest.raises(InputError, match="feature 30 is out of bounds"):
        queue_job(conn, LabelRequest(sae=sae, indices=(1, 30)), broker_app())
    with pytest.raises(InputError, match="give one of --features"):
        queue_job(conn, LabelRequest(sae=sae, features="0:3", unlabeled=True), broker_app())
    assert n_jobs(conn) == before


def test_scores_of_a_new_label_are_not_filed_under_a_different_kept_label(conn, env):
    from interp.records import Explanation, Score
    from interp.store.labels import upsert_explanation, upsert_score

    name = make_sae(conn, 3)
    try:
        sid = conn.execute("SELECT id FROM saes WHERE name = %s", (name,)).fetchone()[0]
        eid = upsert_explanation(conn, sid, Explanation(sae=name, index=0, label="an older label",
                                                        explainer="openai:stub",
                                                        prompt_version=explainer_version("openai:stub")))
        upsert_score(conn, eid, Score(sae=name, index=0, scorer="detection", simulator="openai:stub",
                                      prompt_version="detection-v1", label="an older label", method="json",
                                      value=None, failure="2/2 batches failed: error: HTTP 500"))
        job = queue_job(conn, LabelRequest(sae=name, features="0:3", explainer="openai:stub", scorers=("detection",)),
                        broker_app())
        assert job.n_items == 3                       # feature 0 lacks its score, so it is labelled again
        run_all(job.job_id, 0, 2)
        done = jobs.summaries(conn, job.job_id)[0]
        assert (done.n_done, done.n_failed, done.failures) == (2, 1, {"label_changed": 1})
        kept = conn.execute("SELECT e.label, s.value, s.failure FROM explanations e JOIN scores s ON s.explanation_id"
                            " = e.id WHERE e.id = %s", (eid,)).fetchall()
        assert kept == [("an older label", None, "2/2 batches failed: error: HTTP 500")]
    finally:
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))


def test_the_offline_path_baseline_labels_and_embedding_scores(conn, env):
    name = make_sae(conn, 4)
    try:
        job = queue_job(conn, LabelRequest(sae=name, features="0:4"), broker_app())   # baseline + embedding
        assert run_all(job.job_id, 0, 3) == 4
        done = jobs.summaries(conn, job.job_id)[0]
        assert (done.state, done.n_done, done.tokens) == ("done", 4, 0)
        rows = conn.execute("SELECT e.label, e.is_baseline, s.scorer, s.simulator, s.value FROM explanations e"
                            " JOIN scores s ON s.explanation_id = e.id JOIN saes a ON a.id = e.sae_id"
                            " WHERE a.name = %s ORDER BY e.feature", (name,)).fetchall()
        assert [r[0] for r in rows] == [f'tokens "#{1000 + i}"' for i in range(4)]
        assert {r[1:4] for r in rows} == {(True, "embedding", "minilm")} and all(0 <= r[4] <= 1 for r in rows)
    finally:
        conn.execute("DELETE FROM saes WHERE name = %s", (name,))


def test_the_window_bounds_the_chunks_in_flight(conn, sae, env):
    job = queue_job(conn, LabelRequest(sae=sae, features="0:30", explainer="openai:windowed", simulator="openai:stub",
                                       scorers=("detection",), window=2), broker_app())

    def in_flight():
        return conn.execute("SELECT count(DISTINCT chunk) FROM job_items WHERE job_id = %s AND lease_until IS NOT NULL",
                            (job.job_id,)).fetchone()[0]

    assert in_flight() == 2                             # of 3 chunks of 10
    assert jobs.top_up(conn, job.job_id, 60) == []      # full: nothing more is sent
    sent = []
    run_chunk(job.job_id, 0, 9, sent.extend)
    assert [(c.first, c.last) for c in sent] == [(20, 29)] and in_flight() == 2


def test_a_chunk_loads_two_batches_at_a_time_and_calls_before_the_last_load(conn, sae, env, stub, monkeypatch):
    from interp import labelling

    monkeypatch.setenv("JOB_CHUNK_SIZE", "30")
    monkeypatch.setenv("JOB_BATCH", "1")
    get_settings.cache_clear()
    loading, most, starts, real, lock = [0], [0], [], labelling._load, threading.Lock()

    def counted(*args):         # the real load, timed and counted (loads run in threads)
        with lock:
            starts.append(time.monotonic())
            loading[0] += 1
            most[0] = max(most[0], loading[0])
        try:
            return real(*args)
        finally:
            with lock:
                loading[0] -= 1

    monkeypatch.setattr(labelling, "_load", counted)
    job = queue_job(conn, LabelRequest(sae=sae, features="0:30", explainer="openai:loads", simulator="openai:stub",
                                       scorers=("detection",)), broker_app())
    calls_before = len(stub.request_times)
    assert run_all(job.job_id, 0, 29) == 30
    assert most[0] <= labelling.LOADS_AHEAD and len(starts) == 30
    # the pipeline starts on the first batch, not once the whole chunk is in memory
    assert stub.request_times[calls_before] < starts[-1]


def test_a_worker_process_freezes_its_heap_before_its_first_two_chunks_only():
    # in a child process: freezing this one would take the test session's heap out of the collector's sight
    code = """
import gc
from interp import labelling
counts, alive = [], []
for _ in range(3):
    alive.append([[] for _ in range(100)])  # alive before the chunk: frozen by the first two calls only
    labelling.settle_gc()
    counts.append(gc.get_freeze_count())
print(counts[0] > 0, counts[1] > counts[0] + 99, counts[2] == counts[1], gc.get_threshold()[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "True", "50000"], out.stderr[-2000:]
