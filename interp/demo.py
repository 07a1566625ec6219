"""`interp demo`: the whole service end to end on the embedded defaults, with real services.

Services checked (started when this machine can), the schema migrated, a TopK SAE trained on MiniLM layer 3
(or the one trained before with the same settings reused), evaluated, harvested into Postgres, then two
labelling jobs queued through the same path as `interp label` (the baseline explainer with the embedding scorer
over every feature; an LLM explainer with the simulation scorer over a few features) and run by real Celery
worker processes. It waits with a progress bar and prints the best features, the LLM's labels beside the
baseline's, a search, and where the dashboard is. A second run skips what is done. Whatever it started (workers,
the local LLM server) it stops when it ends or on Ctrl-C; jobs it leaves unfinished on Ctrl-C are cancelled.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from sae.cli_config import opt
from sae.errors import InputError

STAMP = "demo.json"   # what the reusable steps recorded: the training settings and the eval metrics


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes. `--quick` swaps in small ones (the CI test's); the steps are the same."""
    name: str = opt("demo", "catalog name of the demo SAE")
    out: str = opt("runs/demo", "where the demo SAE goes")
    latents: int = opt(1024, "SAE latents")
    k: int = opt(16, "active latents per token")
    tokens: int = opt(150_000, "training tokens")
    eval_tokens: int = opt(20_000, "held-out evaluation tokens")
    harvest_tokens: int = opt(50_000, "corpus tokens harvested into the catalog")
    llm_features: int = opt(3, "features the LLM explainer labels and the simulator scores")
    workers: int = opt(1, "worker processes started when none is running")

    def quick(self) -> "DemoConfig":
        return replace(self, name=self.name + "_quick", out=self.out + "-quick", latents=256, tokens=20_000,
                       eval_tokens=4_000, harvest_tokens=6_000, llm_features=2)


class Steps:
    """Prints each step with how long it took; a step may say it reused earlier work."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.n = 0

    @contextlib.contextmanager
    def step(self, title: str):
        self.n += 1
        t = time.perf_counter()
        typer.echo(f"[{self.n}] {title} ...")
        note: list[str] = []
        yield note
        typer.echo(f"    done in {time.perf_counter() - t:.1f} s{(' (' + note[0] + ')') if note else ''}")

    def total(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------- services
def _listening(host: str, port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def _service_checks(db_url: str, broker_url: str) -> list[tuple[str, str, str, list[str]]]:
    """(service, url, start command shown, start argv) for Postgres and the broker."""
    from urllib.parse import urlparse

    pg_version = next(iter(sorted(os.listdir("/etc/postgresql"))), "15") if os.path.isdir("/etc/postgresql") else "15"
    pg = ["pg_ctlcluster", "--skip-systemctl-redirect", pg_version, "main", "start"]
    redis = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
             "--appendonly", "no"]
    rabbit = ["rabbitmq-server", "-detached"]
    broker_cmd = rabbit if broker_url.startswith("amqp") else redis
    out = []
    for service, url, argv in (("PostgreSQL", db_url, pg), ("the broker", broker_url, broker_cmd)):
        out.append((service, url, " ".join(a or '""' for a in argv), argv))
    return [(s, u, shown, argv) for s, u, shown, argv in out if urlparse(u).hostname is not None]


def ensure_services(db_url: str, broker_url: str) -> list[str]:
    """Starts a local service that is down when this machine has its command; returns one line per service that
    still does not answer, naming it, the URL tried (no password) and the command that starts it."""
    import shutil
    from urllib.parse import urlparse

    from interp.db import redact_url

    missing = []
    for service, url, shown, argv in _service_checks(db_url, broker_url):
        u = urlparse(url)
        host, port = u.hostname, u.port or (5432 if url.startswith("postgres") else 6379 if "redis" in url else 5672)
        if _listening(host, port):
            continue
        if host in ("127.0.0.1", "localhost", "::1") and shutil.which(argv[0]):
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _listening(host, port):
                time.sleep(0.5)
        if not _listening(host, port):
            missing.append(f"{service} does not answer at {redact_url(url)}; start it with: {shown}")
    return missing


# ---------------------------------------------------------------- the SAE: train, evaluate, harvest
def _stamp(cfg: DemoConfig) -> dict:
    return {"latents": cfg.latents, "k": cfg.k, "tokens": cfg.tokens, "model": "minilm", "layer": 3,
            "corpus": "builtin"}


def train_or_reuse(cfg: DemoConfig) -> tuple[dict, bool]:
    """The eval metrics of the demo SAE, training and evaluating it unless the same settings were done before."""
    from sae.evaluate import evaluate
    from sae.train import TrainConfig, train

    stamp = Path(cfg.out) / STAMP
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(stamp.read_text())
        if saved.get("train") == _stamp(cfg) and saved.get("eval_tokens") == cfg.eval_tokens:
            return saved["metrics"], True
    train(TrainConfig(model="minilm", layer=3, corpus="builtin", latents=cfg.latents, k=cfg.k, tokens=cfg.tokens,
                      out=cfg.out, progress=sys.stderr.isatty()))
    metrics = evaluate(cfg.out, corpus="builtin", tokens=cfg.eval_tokens)
    stamp.write_text(json.dumps({"train": _stamp(cfg), "eval_tokens": cfg.eval_tokens, "metrics": metrics}))
    return metrics, False


def harvest_or_reuse(conn, cfg: DemoConfig) -> dict | None:
    """Harvests the demo SAE into the catalog unless the same weights were harvested over the same tokens."""
    from interp.harvest_job import harvest_to_catalog
    from interp.store.saes import harvest_record
    from sae.formats import load_sae

    sha = load_sae(cfg.out).firing_sha()
    rec = harvest_record(conn, cfg.name)
    if rec is not None and rec.weights_sha == sha and rec.harvest.get("requested_tokens") == cfg.harvest_tokens:
        return None
    return harvest_to_catalog(cfg.out, cfg.name, "builtin", cfg.harvest_tokens, replace=True,
                              progress=sys.stderr.isatty())


# ---------------------------------------------------------------- workers and the LLM
class Started:
    """Processes the demo started; stopped (their whole process groups) when it ends."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.llm = None

    def stop(self) -> None:
        import signal

        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()
        if self.llm is not None:
            self.llm.stop()
            self.llm = None


def _serving(app, queue: str) -> int:
    """How many workers on the broker consume `queue`."""
    answers = app.control.inspect(timeout=1.0).active_queues() or {}
    return sum(any(q.get("name") == queue for q in qs) for qs in answers.values())


def ensure_workers(app, n: int, started: Started) -> str:
    """Uses the workers that consume the job queue, or starts `n` worker processes and waits for them."""
    from interp.settings import get_settings

    queue = get_settings().job_queue
    if (running := _serving(app, queue)):
        return f"using {running} running worker(s)"
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"interp-demo-worker-{os.getpid()}.log", "ab")
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", "WARNING",
           "-Q", queue, "--concurrency", str(n), "--without-gossip", "--without-mingle"]
    started.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if started.procs[-1].poll() is not None:
            raise InputError(f"the worker exited with {started.procs[-1].returncode}; see {log.name}")
        if _serving(app, queue):
            return f"started {n} worker process(es), log {log.name}"
    raise InputError(f"the worker did not answer within 90 s; see {log.name}")


def llm_spec(started: Started) -> tuple[str, str]:
    """The explainer for the LLM job: the endpoint at OPENAI_BASE_URL when set, else the local SmolLM2 behind
    llama.cpp's server (started here unless one already answers on the local port)."""
    from interp.local_llm import LocalLLM
    from interp.settings import get_settings

    s = get_settings()
    if s.openai_base_url:
        model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
        return f"openai:{model}", f"the endpoint at {s.openai_base_url}"
    if _listening(s.local_llm_host, s.local_llm_port):
        return "openai:local", f"the local LLM already serving on port {s.local_llm_port}"
    try:
        started.llm = LocalLLM(host=s.local_llm_host, port=s.local_llm_port).start()
    except (RuntimeError, InputError) as e:
        raise InputError(f"cannot start the local LLM ({e}); set OPENAI_BASE_URL to an OpenAI-compatible "
                         "endpoint instead") from None
    return "openai:local", f"SmolLM2-135M-Instruct under llama.cpp on port {s.local_llm_port}, started for the demo"


# ---------------------------------------------------------------- jobs
def queue_jobs(conn, app, cfg: DemoConfig, spec: str) -> tuple[list[int], list[int]]:
    """The two jobs, through `interp label`'s own path: baseline + embedding over every feature, and the LLM
    with the simulation scorer over the densest features (they have full example sets). Returns the job ids
    and the LLM's features."""
    from interp.labelling import LabelRequest, queue_job
    from interp.store.saes import densest_features

    picked = densest_features(conn, cfg.name, cfg.llm_features)
    base = queue_job(conn, LabelRequest(sae=cfg.name, unlabeled=True, explainer="baseline",
                                        scorers=("embedding",)), app)
    llm = queue_job(conn, LabelRequest(sae=cfg.name, indices=tuple(picked), explainer=spec,
                                       scorers=("simulation",)), app)
    return [base.job_id, llm.job_id], picked


ENDED = ("done", "failed", "cancelled", "paused")


def _poll(job_ids: list[int]) -> list:
    """The jobs' summaries on a fresh connection, riding out a database restart (the workers do too)."""
    import psycopg

    from interp.db import connect
    from interp.store.jobs import summaries

    deadline = time.monotonic() + 120
    while True:
        try:
            with connect() as conn:
                return [summaries(conn, j)[0] for j in job_ids]
        except (psycopg.OperationalError, InputError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait_jobs(job_ids: list[int]) -> list:
    """Polls the jobs until they end, with one progress bar over their items."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    jobs = _poll(job_ids)
    with Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("", total=sum(j.n_items for j in jobs), info="")
        while True:
            jobs = _poll(job_ids)
            done = sum(j.n_done + j.n_failed for j in jobs)
            bar.update(task, completed=done, info=f"failed {sum(j.n_failed for j in jobs)}, "
                                                   f"tokens {sum(j.tokens for j in jobs):,}")
            if all(j.state in ENDED for j in jobs):
                return jobs
            time.sleep(1.0)


# ---------------------------------------------------------------- what it shows
def show_results(conn, cfg: DemoConfig, spec: str, llm_features: list[int]) -> None:
    from rich.console import Console
    from rich.markup import escape

    from interp.render import snippet
    from interp.search import search
    from interp.store.features import load_feature_examples
    from interp.store.labels import best_labels, labels_of
    from interp.store.saes import require_sae

    con = Console(highlight=False)
    sid = require_sae(conn, cfg.name)
    best = best_labels(conn, sid, scorer="embedding", limit=10)
    con.print("\n[bold]The ten best-scoring features[/] (baseline labels, embedding AUROC on held-out snippets)")
    for b in best:
        top = next((e for e in load_feature_examples(conn, cfg.name, b.index).examples if e.kind == "top"), None)
        con.print(f"  {b.index:>5}  {b.value:.3f}  {escape(b.label)}  ({escape(b.explainer)})")
        if top is not None:
            con.print(f"         {escape(snippet(top)[:110])}")
    con.print(f"\n[bold]LLM labels ({escape(spec)}, simulation score) beside the baseline's[/]")
    for idx in llm_features:
        labs = labels_of(conn, sid, idx)
        for lab in labs:
            sc = ", ".join(f"{s.scorer} {s.value:.3f}" if s.value is not None else f"{s.scorer} undefined"
                           for s in lab.scores) or "not scored"
            text = lab.label if lab.label is not None else f"(no label: {lab.failure})"
            con.print(f"  {idx:>5}  {escape(lab.explainer):<14} {escape(text[:90])}  " + escape(f"[{sc}]"))
    word = next((w for b in best for w in re.findall(r"[A-Za-z]{4,}", b.label)
                 if w.lower() not in ("tokens", "token", "line", "starts", "after")), None)
    if word:
        hits = search(conn, word, sae=cfg.name, limit=3)
        con.print(f"\n[bold]interp search {word!r} --sae {cfg.name}[/]")
        for h in hits:
            con.print(f"  {h.index:>5}  {escape(h.label)}   ({h.show})")
    con.print("\nThe dashboard: run [bold]interp serve[/] and open http://127.0.0.1:8000/ "
              f"(e.g. http://127.0.0.1:8000/saes/{cfg.name}/features/{best[0].index if best else 0})")


def _prepare(conn, cfg: DemoConfig, steps: Steps) -> None:
    """Schema, SAE and harvest: each skipped when already done with the same settings."""
    from interp.db import migrate

    with steps.step("migrating the database") as note:
        applied = migrate(conn)
        note.append(f"applied {', '.join(applied)}" if applied else "up to date")
    with steps.step(f"training a TopK SAE on MiniLM layer 3 ({cfg.latents} latents, k={cfg.k}, "
                    f"{cfg.tokens:,} builtin tokens) and evaluating it") as note:
        metrics, reused = train_or_reuse(cfg)
        note.append(("reused " + cfg.out + "; " if reused else "") +
                    f"FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.3f}")
    with steps.step(f"harvesting {cfg.harvest_tokens:,} tokens into the catalog as {cfg.name!r}") as note:
        out = harvest_or_reuse(conn, cfg)
        note.append("already harvested" if out is None else f"{out['features']} features, {out['examples']:,} examples")


def run(cfg: DemoConfig) -> None:
    from interp.db import connect
    from interp.labelling import broker_app
    from interp.settings import get_settings
    from interp.store.jobs import cancel

    s = get_settings()
    steps, started, job_ids = Steps(), Started(), []
    try:
        with steps.step("checking services"):
            missing = ensure_services(s.database_url, s.celery_broker_url)
            if missing:
                for line in missing:
                    typer.echo(f"error: {line}", err=True)
                raise typer.Exit(2)
        app = broker_app()
        with connect() as conn:
            _prepare(conn, cfg, steps)
            with steps.step("workers") as note:
                note.append(ensure_workers(app, cfg.workers, started))
            with steps.step("the LLM endpoint") as note:
                spec, where = llm_spec(started)
                note.append(where)
            job_ids, llm_features = queue_jobs(conn, app, cfg, spec)
        with steps.step(f"running labelling jobs {job_ids[0]} (baseline, embedding scorer, every feature) and "
                        f"{job_ids[1]} ({spec}, simulation scorer, {len(llm_features)} features)") as note:
            jobs = wait_jobs(job_ids)
            note.append("; ".join(f"job {j.job_id} {j.state}: {j.n_done} done, {j.n_failed} failed, "
                                  f"{j.tokens:,} tokens" for j in jobs))
        with connect() as conn:
            show_results(conn, cfg, spec, llm_features)
        typer.echo(f"\ndemo finished in {steps.total():.0f} s")
    except KeyboardInterrupt:
        with contextlib.suppress(Exception), connect() as conn:
            for j in job_ids:
                cancel(conn, j)
        raise
    finally:
        started.stop()
