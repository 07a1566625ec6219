"""What the API and dashboard tests share: a small labelled catalog in the real Postgres (a random-weight SAE
harvested over the builtin corpus, a few labels and scores written through the store), and a real
`interp serve` subprocess on a free port, and an `interp worker` on a queue of the tests' own."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from interp.db import connect
from interp.records import Explanation, Score
from interp.store.labels import upsert_explanation, upsert_score
from interp.store.saes import densest_features, require_sae

URL = os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent
WRITE_TOKEN = "w-" + uuid.uuid4().hex      # distinctive, so a test can look for it in logs and bodies
READ_TOKEN = "r-" + uuid.uuid4().hex
BROKER = "redis://127.0.0.1:6379/13"    # this suite's own Redis db: the jobs it queues go nowhere else
QUEUE = f"test-api-{uuid.uuid4().hex[:8]}"
JOB_ENV = {"CELERY_BROKER_URL": BROKER, "REDIS_URL": BROKER, "JOB_QUEUE": QUEUE, "JOB_CHUNK_SIZE": "4",
           "SEARCH_INDEX_DIR": tempfile.mkdtemp(prefix="api-search-index-")}
LABELS = ["numbers and digits in dates", "the word 'the' before nouns", "<script>alert('x')</script> & tags"]


@dataclass
class Catalog:
    name: str
    labelled: list[int]         # feature indexes with a label, LABELS[i] on labelled[i]
    n_features: int


def build_catalog(tmp: Path) -> Catalog:
    """Harvests a 128-feature random SAE on MiniLM layer 1 over 2,048 builtin tokens and labels three of its
    densest features: an embedding score on each, a second (simulation) score and a failed label on the first."""
    from interp.harvest_job import harvest_to_catalog
    from sae.archs import SAEConfig, build
    from sae.configs import HarvestConfig
    from sae.formats import save_native

    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=384, n_latents=128, k=6, model="minilm", layer=1, site="resid"))
    sae_dir = str(save_native(sae, tmp / "sae"))
    name = f"apitest_{uuid.uuid4().hex[:8]}"
    harvest_to_catalog(sae_dir, name, "builtin", 2048, cfg=HarvestConfig(top_k=10, window=16, ctx_len=32),
                       batch_size=8, device="cpu", progress=False, url=URL)
    with connect(URL) as conn:
        sid = require_sae(conn, name)
        feats = densest_features(conn, name, len(LABELS))
        for i, (f, label) in enumerate(zip(feats, LABELS)):
            eid = upsert_explanation(conn, sid, Explanation(sae=name, index=f, label=label, explainer="baseline",
                                                            prompt_version="v1", is_baseline=True))
            upsert_score(conn, eid, Score(sae=name, index=f, scorer="embedding", simulator="minilm",
                                          prompt_version="v1", label=label, method="embedding", value=0.9 - i / 10))
        eid = upsert_explanation(conn, sid, Explanation(sae=name, index=feats[0], label=LABELS[0],
                                                        explainer="openai:stub", prompt_version="v2"))
        upsert_score(conn, eid, Score(sae=name, index=feats[0], scorer="simulation", simulator="openai:stub",
                                      prompt_version="v2", label=LABELS[0], method="logprobs", value=0.42))
        upsert_explanation(conn, sid, Explanation(sae=name, index=feats[1], label=None, explainer="openai:broken",
                                                  prompt_version="v2", failure="refusal"))
    return Catalog(name=name, labelled=feats, n_features=128)


def drop_catalog(cat: Catalog) -> None:
    with connect(URL) as conn:
        conn.execute("DELETE FROM saes WHERE name = %s", (cat.name,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, "DATABASE_URL": URL, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **JOB_ENV, **env}
    for k in ("INTERP_API_TOKEN", "INTERP_API_READ_TOKEN"):
        if k not in env:
            full.pop(k, None)
    return full


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drop_queue() -> None:
    """The test queue, its kombu bindings and whatever tasks are left in it (the db is this suite's own)."""
    import redis

    with redis.Redis.from_url(BROKER) as r:
        r.delete(QUEUE, f"_kombu.binding.{QUEUE}", f"_kombu.binding_permanent.{QUEUE}")


@contextlib.contextmanager
def worker(log: Path):
    """`interp worker` (one process) on the test queue."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "interp.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                                env=child_env({}), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def server(log: Path, **env: str):
    """`interp serve` in a subprocess with `env` added (tokens, DATABASE_URL); yields its base URL once it
    answers. Its stdout and stderr go to `log`."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "interp.cli", "serve", "--port", str(port)], cwd=ROOT,
                                env=child_env(env), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/openapi.json", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"interp serve did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield base
    finally:
        stop(proc)
