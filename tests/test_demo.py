"""README's main command, `interp demo`, end to end in its quick size (--quick changes sizes, not steps): real
Postgres, Redis and Celery worker processes, the LLM job against an OpenAI-compatible stub over HTTP. Labels and
scores land in Postgres, `interp search` finds a demo feature by a word of its label, and a second run skips
what is done."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ENV
from tests.stub_llm import Reply, StubLLM, digit_tops

NAME = "demo_quick"


def demo_argv() -> list[str]:
    """README's demo command (`interp demo`), at the size CI can afford."""
    return ["interp", "demo", "--quick"]


def simulator(body: dict) -> Reply:
    """An explainer that names digits, and a simulator that says 5 on every token of the snippet it is shown."""
    system = body["messages"][0]["content"]
    if system.startswith("You label"):
        return Reply("Label: digits and numbers")
    user = body["messages"][-1]["content"]
    lines = [ln for ln in user.split("\n") if ln and not ln.startswith(("There are", "Feature:", "Tokens:"))]
    reply = Reply("".join(ln + "\t5\n" for ln in lines))
    reply.tops = {i: digit_tops(5.0) for i, tok in enumerate(reply.tokens()) if tok == "5"}
    return reply


def run_demo(stub: StubLLM) -> subprocess.CompletedProcess:
    env = {**ENV, "OPENAI_BASE_URL": stub.url, "OPENAI_API_KEY": "none", "OPENAI_MODEL": "stub",
           "JOB_CHUNK_SIZE": "32"}
    argv = [sys.executable, "-m", "interp.cli", *demo_argv()[1:]]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.environ.get("INTERP_DEMO_CWD", os.getcwd()))


@pytest.fixture(scope="module")
def stub():
    with StubLLM() as s:
        s.responder = simulator
        yield s


def test_demo_end_to_end_then_again_skipping_what_is_done(conn, stub):
    # a demo catalog left by an earlier run (jobs and labels cascade) would make the first run a second one
    conn.execute("DELETE FROM saes WHERE name = %s", (NAME,))
    first = run_demo(stub)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    sid = conn.execute("SELECT id FROM saes WHERE name = %s", (NAME,)).fetchone()[0]
    n_features = conn.execute("SELECT n_features FROM saes WHERE id = %s", (sid,)).fetchone()[0]
    # every feature has its baseline label and embedding score; the LLM's features have a simulation score
    base = conn.execute("SELECT count(DISTINCT e.feature) FROM explanations e JOIN scores s ON s.explanation_id = e.id"
                        " WHERE e.sae_id = %s AND e.explainer = 'baseline' AND s.scorer = 'embedding'",
                        (sid,)).fetchone()[0]
    assert base + _failed(conn, sid, "baseline") == n_features and base > n_features // 2
    llm = conn.execute("SELECT count(*) FROM explanations e JOIN scores s ON s.explanation_id = e.id"
                       " WHERE e.sae_id = %s AND e.explainer = 'openai:stub' AND s.scorer = 'simulation'"
                       " AND e.label = 'digits and numbers'", (sid,)).fetchone()[0]
    assert llm == 2
    assert "The ten best-scoring features" in first.stdout and "interp serve" in first.stdout

    label = conn.execute("SELECT e.label FROM explanations e JOIN scores s ON s.explanation_id = e.id"
                         " WHERE e.sae_id = %s AND e.explainer = 'baseline' ORDER BY s.value DESC LIMIT 1",
                         (sid,)).fetchone()[0]
    word = max(re.findall(r"[A-Za-z]{3,}", label), key=len)
    found = subprocess.run([sys.executable, "-m", "interp.cli", "search", word, "--sae", NAME, "--json"], env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert any(word.lower() in r["label"].lower() for r in json.loads(found.stdout)["results"])

    again = run_demo(stub)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "reused" in again.stdout and "already harvested" in again.stdout
    assert len(re.findall(r"job \d+ done: 0 done", again.stdout)) == 2, again.stdout[-1500:]


def _failed(conn, sid: int, explainer: str) -> int:
    return conn.execute("SELECT count(DISTINCT feature) FROM job_items i JOIN jobs j ON j.id = i.job_id"
                        " WHERE j.sae_id = %s AND j.params->>'explainer' = %s AND i.state = 'failed'",
                        (sid, explainer)).fetchone()[0]
