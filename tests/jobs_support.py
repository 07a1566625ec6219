"""What the labelling-job tests and the throughput bench share: a synthetic SAE written to the catalog in a
second, a stub LLM that knows the answers, and real worker processes started and killed as process groups."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from interp.store.harvest import write_harvest
from interp.store.saes import SAEMeta
from sae.harvest import Examples, HarvestResult
from tests.stub_llm import Reply

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 8
# per feature: (kind code, split code, how many); explain and score windows come from distinct contexts
LAYOUT = ((0, 0, 3), (0, 1, 3), (2, 0, 2), (2, 1, 3))


def synthetic_harvest(n_features: int, seed: int = 0, with_examples: bool = True) -> HarvestResult:
    """Feature f fires on token id 1000 + f at position 5 of its top windows; random windows are silent."""
    rng = np.random.default_rng(seed)
    per = sum(n for _, _, n in LAYOUT) if with_examples else 0
    m = n_features * per
    kind = np.tile(np.concatenate([np.full(n, k) for k, _, n in LAYOUT]), n_features) if per else np.zeros(0)
    split = np.tile(np.concatenate([np.full(n, s) for _, s, n in LAYOUT]), n_features) if per else np.zeros(0)
    feature = np.repeat(np.arange(n_features), per)
    acts = np.zeros((m, WIDTH), np.uint8)
    top = kind == 0
    acts[top, 5] = 255
    tokens = rng.integers(0, 900, size=(m, WIDTH)).astype(np.int32)
    tokens[top, 5] = 1000 + feature[top]
    ex = Examples(feature=feature.astype(np.int32), kind=kind.astype(np.int8), split=split.astype(np.int8),
                  ctx=np.arange(m, dtype=np.int32), start=np.zeros(m, np.int16),
                  max_pos=np.where(top, 5, 0).astype(np.int16), qbin=np.full(m, -1, np.int16),
                  scale=np.where(top, 3.0, 0.0).astype(np.float32), acts=acts)
    return HarvestResult(n_tokens=m * WIDTH, ctx_len=WIDTH, width=WIDTH, density=np.full(n_features, 0.01, np.float32),
                         n_fired=np.full(n_features, 10), max_act=np.full(n_features, 3.0, np.float32),
                         mean_act=np.full(n_features, 1.0, np.float32), hist=np.zeros((n_features, 1), np.int32),
                         hist_max=np.full(n_features, 3.0, np.float32), examples=ex,
                         contexts={i: tokens[i] for i in range(m)})


def make_sae(conn, n_features: int, with_examples: bool = True) -> str:
    name = f"jobs_{uuid.uuid4().hex[:10]}"
    meta = SAEMeta(model="synthetic", layer=0, site="resid", d_in=8, n_features=n_features, arch="topk", k=4)
    write_harvest(conn, name, meta, synthetic_harvest(n_features, with_examples=with_examples))
    return name


def oracle(body: dict) -> Reply:
    """The explainer names the feature's token; the detector says 1 for snippets holding a #1xxx token."""
    system = body["messages"][0]["content"]
    user = body["messages"][-1]["content"]
    if "numbered text snippets" in system:
        snippets = re.findall(r"^\d+\. (.*)$", user, re.M)
        return Reply(json.dumps([int("#1" in s and bool(re.search(r"#1\d{3}", s))) for s in snippets]))
    m = re.search(r"#(1\d{3})", user)
    return Reply(f"Label: the token #{m.group(1) if m else 'none'}")


def worker_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


def start_worker(env: dict, concurrency: int = 2, log: Path | None = None, via_cli: bool = False) -> subprocess.Popen:
    """A real worker, `celery -A workers.app worker` (or `interp worker`, which becomes it), in its own process
    group (so kill -9 takes all of it)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    args = ["--concurrency", str(concurrency)]
    if via_cli:
        cmd = [sys.executable, "-m", "interp.cli", "worker", "--queues", env["JOB_QUEUE"], *args]
    else:
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", "INFO", "-Q",
               env["JOB_QUEUE"], *args, "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"w{uuid.uuid4().hex[:6]}@%h"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=10)


def stop_worker(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            kill_group(p)


def wait_for(cond, timeout: float, every: float = 0.25, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
