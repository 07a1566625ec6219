"""`interp explain`: one feature from a JSON file through the real CLI; bad input is one line and exit 2."""
import json
import subprocess
import sys
from dataclasses import asdict

from tests.planted import planted_features


def interp(*args):
    return subprocess.run([sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_explain_baseline_with_embedding_score_as_json(tmp_path):
    rule, fe = next((r, f) for r, f in planted_features(n_contexts=1500) if r.name == "def")
    path = tmp_path / "feature.json"
    path.write_text(json.dumps(asdict(fe)))
    out = interp("explain", str(path), "--explainer", "baseline", "--scorer", "embedding", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["explanation"]["label"].startswith('tokens "def"') and doc["explanation"]["is_baseline"] is True
    (score,) = doc["scores"]
    assert score["scorer"] == "embedding" and 0.0 <= score["value"] <= 1.0 and len(score["breakdown"]) == 12


def test_explain_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"sae": "x"}')
    for args, msg in [((str(tmp_path / "none.json"),), "not found"),
                      ((str(bad),), "is not a feature file"),
                      ((str(bad), "--explainer", "gpt4"), "is not a feature file")]:
        out = interp("explain", *args)
        assert out.returncode == 2 and msg in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_explain_llm_scorer_without_llm_is_one_line(tmp_path):
    _, fe = planted_features(n_contexts=1500)[0]
    path = tmp_path / "f.json"
    path.write_text(json.dumps(asdict(fe)))
    out = interp("explain", str(path), "--scorer", "simulation")
    assert out.returncode == 2 and "need an LLM simulator" in out.stderr and len(out.stderr.strip().splitlines()) == 1
