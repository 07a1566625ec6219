"""A harvest stopped mid-way (an exception, kill -9) goes on from its last checkpoint and ends with the bits of a
harvest that never stopped; a checkpoint of other arguments is not resumed."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae.formats import load_sae
from sae.harvest import Checkpoint, HarvestConfig, HarvestState, harvest
from sae.models import hooked
from tests.helpers import ENV, catalog_rows

CFG = HarvestConfig(top_k=10, window=16, ctx_len=32)
BATCH = 8           # contexts per forward: 256 tokens, 16 forwards per CPU update group of 4,096 tokens


@pytest.fixture(scope="module")
def model(sae_dir):
    return load_sae(sae_dir), hooked("minilm", 1, "resid", "cpu")


def _forwards(monkeypatch, hm, fail_after=None) -> list:
    """Counts the model's forwards from now on; the one after `fail_after` raises, as a crash would."""
    calls, run = [], type(hm).activations

    def counted(self, tok):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("crash")
        return run(self, tok)

    monkeypatch.setattr(type(hm), "activations", counted)
    return calls


def _assert_same(got, want):
    for k in ("density", "n_fired", "max_act", "mean_act", "hist", "hist_max"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k), err_msg=k)
    for k in want.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(want.examples, k), err_msg=k)
    assert got.contexts.keys() == want.contexts.keys()


def test_a_stopped_harvest_resumes_to_the_bits_of_an_unbroken_one(model, tmp_path, monkeypatch):
    sae, hm = model
    tokens = 64 * BATCH * CFG.ctx_len                       # 64 forwards, 4 update groups
    unbroken = harvest(hm, sae, "builtin", tokens, CFG, batch_size=BATCH, progress=False).result()
    ck = Checkpoint(tmp_path / "progress.pt", sae.firing_sha(), every_s=0)     # at every update group

    with monkeypatch.context() as m:
        _forwards(m, hm, fail_after=40)
        with pytest.raises(RuntimeError, match="crash"):
            harvest(hm, sae, "builtin", tokens, CFG, batch_size=BATCH, progress=False, checkpoint=ck)
    saved, extra = HarvestState.load_with(ck.path)
    # a whole update group before the crash (the last, unless saves were spaced to 20x their own duration)
    assert extra["batches"] in (16, 32)
    with monkeypatch.context() as m:
        calls = _forwards(m, hm)
        state = harvest(hm, sae, "builtin", tokens, CFG, batch_size=BATCH, progress=False, checkpoint=ck)
    assert len(calls) == 64 - extra["batches"]              # the saved batches are not run again
    assert state.resumed_tokens == saved.n_tokens > 0
    _assert_same(state.result(), unbroken)

    # a checkpoint of another harvest (here: fewer tokens) is not resumed, and is replaced
    with monkeypatch.context() as m:
        calls = _forwards(m, hm)
        state = harvest(hm, sae, "builtin", tokens // 2, CFG, batch_size=BATCH, progress=False, checkpoint=ck)
    assert len(calls) == 32 and state.resumed_tokens == 0
    assert HarvestState.load_with(ck.path)[1]["key"] != extra["key"]


def test_killed_cli_harvest_goes_on_from_its_checkpoint(conn, names, sae_dir, cli, tmp_path):
    args = ("--sae", sae_dir, "--tokens", str(256 * BATCH * CFG.ctx_len), "--ctx-len", "32", "--ctx", "16",
            "--top", "10", "--batch-size", str(BATCH), "--state-dir", str(tmp_path), "--json")
    ref, name = names(), names()
    assert cli("harvest", "--name", ref, *args, "--checkpoint-every", "0").returncode == 0
    assert not list(tmp_path.iterdir())                     # no checkpoints asked for, none written

    progress = tmp_path / "progress-0-of-1.pt"
    p = subprocess.Popen([sys.executable, "-m", "interp.cli", "harvest", "--name", name, *args,
                          "--checkpoint-every", "0.001"], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not progress.exists():
        assert p.poll() is None and time.time() < deadline, "the harvest ended before its first checkpoint"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert catalog_rows(conn, name) is None                  # nothing written to the catalog

    r = cli("harvest", "--name", name, *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 0 < out["resumed_tokens"] < out["tokens"]
    assert catalog_rows(conn, name) == catalog_rows(conn, ref)
    assert not progress.exists()                             # done: the checkpoint is gone
