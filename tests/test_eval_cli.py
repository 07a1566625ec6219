"""`interp sae eval` and `interp sae convert` as a user runs them: one `error:` line and exit 2 on bad input."""
from __future__ import annotations

import json
import os
import pydoc_data.topics
import subprocess
import sys

import pytest
import torch

from sae.archs import SAEConfig, build
from sae.formats import save_native


def interp(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:20]))
    return str(path)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("sae") / "minilm-l1"
    save_native(build(SAEConfig(d_in=384, n_latents=256, k=8, model="minilm", layer=1, ctx_len=32)), d)
    return d


def test_eval_json_after_convert(tmp_path, sae_dir, corpus):
    res = interp("sae", "convert", str(sae_dir), "--to", "saelens", "--out", str(tmp_path / "lens"))
    assert res.returncode == 0, res.stderr
    res = interp("sae", "eval", str(tmp_path / "lens"), "--corpus", corpus, "--tokens", "300", "--device", "cpu",
                 "--json")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert m["tokens"] >= 300 and 0 < m["fvu"] and m["l0"] <= 8 and 0 <= m["dead_frac"] <= 1
    assert (m["model"], m["layer"], m["site"]) == ("minilm", 1, "resid")


def test_missing_model(tmp_path, sae_dir, corpus):
    res = interp("sae", "eval", str(sae_dir), "--model", str(tmp_path / "no-model"), "--corpus", corpus)
    assert_one_line_error(res, "cannot load model", "no-model")


def test_unknown_hub_model_offline(sae_dir, corpus):
    res = interp("sae", "eval", str(sae_dir), "--model", "no-such-org/no-such-model", "--corpus", corpus)
    assert_one_line_error(res, "cannot load model 'no-such-org/no-such-model'")


def test_layer_out_of_range(sae_dir, corpus):
    res = interp("sae", "eval", str(sae_dir), "--layer", "9", "--corpus", corpus)
    assert_one_line_error(res, "layer 9 is out of range", "valid layers: 0..5")


def test_d_in_mismatch(tmp_path, corpus):
    save_native(build(SAEConfig(d_in=768, n_latents=256, k=8, model="minilm", layer=2)), tmp_path / "big")
    res = interp("sae", "eval", str(tmp_path / "big"), "--corpus", corpus)
    assert_one_line_error(res, "SAE d_in 768 does not match model minilm layer 2 site resid (d=384)")


def test_truncated_safetensors(tmp_path, sae_dir, corpus):
    res = interp("sae", "convert", str(sae_dir), "--to", "sparsify", "--out", str(tmp_path / "sp"))
    assert res.returncode == 0, res.stderr
    weights = tmp_path / "sp" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(interp("sae", "eval", str(tmp_path / "sp"), "--corpus", corpus), "corrupt or truncated")
    res = interp("sae", "convert", str(tmp_path / "sp"), "--to", "native", "--out", str(tmp_path / "n"))
    assert_one_line_error(res, "corrupt or truncated")
    assert not (tmp_path / "n").exists()


def test_unknown_format_and_missing_dir(tmp_path, sae_dir):
    res = interp("sae", "convert", str(sae_dir), "--to", "onnx", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "unknown format 'onnx'", "native, saelens, sparsify")
    assert not (tmp_path / "o").exists()
    res = interp("sae", "convert", str(tmp_path / "none"), "--to", "saelens", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "not found")
    assert not (tmp_path / "o").exists() and os.listdir(tmp_path) == []
