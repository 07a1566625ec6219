"""The one CLI, `interp`. Commands are thin: they parse flags and call into `sae` and `interp` modules.

Each room owns its own section below; keep heavy imports inside the commands so `interp --help` is fast.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from interp.demo import DemoConfig
from sae.cli_config import config_command
from sae.configs import HarvestConfig, TrainConfig
from sae.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
sae_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and convert sparse autoencoders.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
llm_app = typer.Typer(no_args_is_help=True, help="The local LLM endpoint.")
app.add_typer(sae_app, name="sae")
app.add_typer(db_app, name="db")
app.add_typer(llm_app, name="llm")


def emit_json(obj) -> None:
    """--json prints one object on stdout and nothing else there."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- sae (issue 2)
@sae_app.command("train")
@config_command(TrainConfig)
def sae_train(cfg: TrainConfig, json_out: bool = typer.Option(False, "--json")):
    """Train an SAE on a model's activations at one hook site."""
    from sae.train import train

    summary = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if json_out:
        emit_json(summary)
    else:
        typer.echo(f"trained {summary['tokens']:,} tokens in {summary['seconds']:.0f}s: fvu {summary['fvu']:.4f}, "
                   f"l0 {summary['l0']:.1f}, dead {summary['dead_frac']:.3f} -> {summary['out']}")


@sae_app.command("eval")
def sae_eval(
    path: str = typer.Argument(..., help="SAE directory (native, SAELens or sparsify)"),
    corpus: str = typer.Option("builtin"),
    tokens: int = typer.Option(50_000),
    model: Optional[str] = typer.Option(None, help="override the model recorded in the SAE's config"),
    layer: Optional[int] = typer.Option(None),
    site: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(16, "--batch-size", help="contexts per forward pass"),
    seed: Optional[int] = typer.Option(None, help="corpus order (default: the SAE's training seed, so the "
                                                  "held-out split is the one training left out)"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Evaluate an SAE on held-out tokens: FVU, L0, dead and dense fractions, and CE/KL for causal LMs."""
    from sae.evaluate import evaluate

    if batch_size <= 0:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}")
    metrics = evaluate(path, corpus=corpus, tokens=tokens, model=model, layer=layer, site=site, device=device,
                       batch_size=batch_size, seed=seed)
    if json_out:
        emit_json(metrics)
    else:
        for key, val in metrics.items():
            typer.echo(f"{key:>16}: {val}")


@sae_app.command("convert")
def sae_convert(
    path: str = typer.Argument(...),
    to: str = typer.Option(..., help="native | saelens | sparsify"),
    out: str = typer.Option(...),
):
    """Convert an SAE directory (any format, auto-detected) to another format."""
    from sae.formats import convert

    convert(path, to, out)
    typer.echo(f"wrote {to} SAE to {out}")


# ---------------------------------------------------------------- db + harvest (issue 3)
@db_app.command("migrate")
def db_migrate(json_out: bool = typer.Option(False, "--json")):
    """Apply the numbered SQL migrations not yet applied (a no-op when up to date)."""
    from interp.db import connect, migrate

    with connect() as conn:
        applied = migrate(conn)
    if json_out:
        emit_json({"applied": applied})
    else:
        typer.echo(f"applied {', '.join(applied)}" if applied else "schema up to date")


@app.command("harvest")
@config_command(HarvestConfig)
def harvest_cmd(
    cfg: HarvestConfig,
    sae: str = typer.Option(..., help="SAE directory (native, SAELens or sparsify)"),
    name: str = typer.Option(..., help="catalog name for this SAE"),
    corpus: str = typer.Option("builtin", help="builtin | FILE/DIR (.txt/.jsonl) | hf:NAME[:SPLIT]"),
    tokens: int = typer.Option(..., help="corpus tokens to run through model and SAE"),
    shard: Optional[str] = typer.Option(None, help="i/n: harvest one slice; the last shard to finish merges"),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="where shards leave partial states"),
    replace: bool = typer.Option(False, "--replace", help="replace an SAE of the same name"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    batch_size: int = typer.Option(16, "--batch-size", help="contexts per forward"),
    shards: Optional[int] = typer.Option(None, help="N: queue N shard tasks for the workers (see --queue)"),
    queue: Optional[str] = typer.Option(None, help="with --shards: the queue (default: settings.harvest_queue)"),
    checkpoint_every: float = typer.Option(300.0, "--checkpoint-every",
                                           help="seconds between progress checkpoints (0: none)"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Stream a corpus through model and SAE; store each feature's examples and stats in the catalog.
    With --shards N, queue it as N Celery tasks instead (`interp worker --queues harvest` runs them).
    Progress is saved every --checkpoint-every seconds beside the shard states: the same command, run again
    after a crash or a kill, goes on from there."""
    from interp.harvest_job import harvest_to_catalog

    if not checkpoint_every >= 0:
        raise InputError(f"--checkpoint-every takes seconds >= 0 (0: no checkpoints), got {checkpoint_every}")
    if shards is not None or queue is not None:
        if shards is None or shard is not None or state_dir is not None:
            raise InputError("--queue needs --shards N, and --shards takes neither --shard nor --state-dir "
                             "(the workers' states go under settings.harvest_state_root)")
        return _queue_harvest(sae, name, corpus, tokens, cfg, shards, queue, replace, device, batch_size, json_out)
    summary = harvest_to_catalog(sae, name, corpus, tokens, cfg=cfg, shard=shard, replace=replace, device=device,
                                 batch_size=batch_size, state_dir=state_dir, progress=sys.stderr.isatty(),
                                 checkpoint_every=checkpoint_every)
    if json_out:
        emit_json(summary)
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


def _queue_harvest(sae, name, corpus, tokens, cfg, shards, queue, replace, device, batch_size, json_out) -> None:
    from interp.db import connect
    from interp.harvest_queue import queue_harvest
    from interp.labelling import broker_app

    with connect() as conn:
        job = queue_harvest(conn, broker_app(), sae, name, corpus, tokens, cfg=cfg, shards=shards, queue=queue,
                            replace=replace, device=device, batch_size=batch_size)
    if json_out:
        emit_json(job.model_dump(mode="json"))
    else:
        typer.echo(f"queued harvest job {job.job_id} of {name}: {shards} shards; `interp jobs {job.job_id}` shows it")


@app.command("feature")
def feature_cmd(
    name: str = typer.Argument(..., help="SAE name in the catalog"),
    idx: int = typer.Argument(..., help="feature index"),
    n: int = typer.Option(8, "--n", "-n", help="snippets shown per set"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Show one feature: stats, histogram, snippets with activating tokens marked, labels and scores."""
    from interp.db import connect
    from interp.render import print_feature
    from interp.store.features import feature_view

    with connect() as conn:
        view = feature_view(conn, name, idx)
    if json_out:
        emit_json(view.model_dump())
    else:
        print_feature(view, n)


# ---------------------------------------------------------------- labelling, llm (issue 4)
@llm_app.command("serve")
def llm_serve(
    port: Optional[int] = typer.Option(None, help="port (default: settings.local_llm_port, env LOCAL_LLM_PORT)"),
    host: Optional[str] = typer.Option(None, help="listen address (default: settings.local_llm_host)"),
    model_file: Optional[str] = typer.Option(None, "--model-file", help="a .gguf model (default: the embedded SmolLM2-135M-Instruct)"),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="context window in tokens"),
):
    """Serve the local LLM over the OpenAI protocol in the foreground (the endpoint behind `openai:local`)."""
    from interp.local_llm import server_command
    from interp.settings import get_settings

    s = get_settings()
    host, port = host or s.local_llm_host, port or s.local_llm_port
    cmd = server_command(model_file, host, port, n_ctx)
    hint = "" if port == s.local_llm_port else f" (set LOCAL_LLM_PORT={port} for openai:local)"
    typer.echo(f"local LLM: {cmd[cmd.index('--model') + 1]}\nserving http://{host}:{port}/v1 as openai:local{hint}; Ctrl-C stops")
    sys.stdout.flush()
    # become the server: signals reach it directly and no orphan is left behind
    os.execv(cmd[0], cmd)


@app.command("explain")
def explain_cmd(
    feature_file: str = typer.Argument(..., help="JSON FeatureExamples (sae, index, examples)"),
    explainer: str = typer.Option("baseline", help="openai:MODEL | openai:local | hf:PATH | baseline"),
    simulator: Optional[str] = typer.Option(None, help="model spec for the LLM scorers (default: the explainer)"),
    scorer: str = typer.Option("embedding", help="comma-separated: simulation,detection,fuzzing,embedding"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Label and score one feature from a JSON file, without the catalog (for debugging prompts and models)."""
    import asyncio

    from interp.scorers import label_feature, read_feature_file

    fe = read_feature_file(feature_file)
    names = [s.strip() for s in scorer.split(",") if s.strip()]
    result = asyncio.run(label_feature(fe, explainer, simulator, names))
    ex = result.explanation
    if json_out:
        emit_json(result.model_dump())
        return
    typer.echo(f"label: {ex.label}" if ex.ok else f"no label: {ex.failure}")
    if ex.ok and ex.failure:
        typer.echo(f"not scored: {ex.failure}")
    for s in result.scores:
        vals = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=undefined" for k, v in s.values.items())
        typer.echo(f"{s.scorer:>10} ({s.method}, {s.usage.total} tokens): {vals}")
    if ex.failure:
        sys.exit(1)


# ---------------------------------------------------------------- labelling jobs (issue 14)
@app.command("label")
def label_cmd(
    sae: Optional[str] = typer.Option(None, help="SAE name in the catalog"),
    features: Optional[str] = typer.Option(None, help="A:B, half-open: the features to label"),
    unlabeled: bool = typer.Option(False, "--unlabeled", help="every feature without this label and these scores"),
    explainer: str = typer.Option("baseline", help="openai:MODEL | openai:local | hf:PATH | baseline"),
    simulator: Optional[str] = typer.Option(None, help="model spec for the LLM scorers (default: the explainer)"),
    scorer: str = typer.Option("embedding", help="comma-separated: simulation,detection,fuzzing,embedding"),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="pause the job at this many LLM tokens"),
    resume: Optional[int] = typer.Option(None, "--resume", help="resume a paused or cancelled job by id"),
    check_endpoint: bool = typer.Option(False, "--check-endpoint", help="fail now if the LLM endpoint is unreachable"),
    window: Optional[int] = typer.Option(None, help="chunks in the broker or a worker at once (default JOB_WINDOW, "
                                                    "16); about twice the fleet's worker processes"),
    wait: bool = typer.Option(False, "--wait", help="show progress until the job ends"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Queue a labelling job on the workers (or resume one); prints its id. Features already labelled and scored
    with these settings are skipped."""
    from interp.db import connect
    from interp.labelling import LabelRequest, broker_app, queue_job, resume_job

    app_ = broker_app()
    with connect() as conn:
        if resume is not None:
            job = resume_job(conn, resume, budget_tokens, app_)
        else:
            if not sae:
                raise InputError("give --sae NAME (or --resume JOB)")
            req = LabelRequest(sae=sae, features=features, unlabeled=unlabeled, explainer=explainer,
                               simulator=simulator, scorers=tuple(s.strip() for s in scorer.split(",") if s.strip()),
                               budget_tokens=budget_tokens, check_endpoint=check_endpoint, window=window)
            job = queue_job(conn, req, app_)
        if wait:
            job = _wait_job(conn, job.job_id)
    if json_out:
        emit_json(job.model_dump(mode="json"))
    elif not wait:
        typer.echo(f"job {job.job_id}: {job.n_items} features of {job.sae} {job.state}; follow it with "
                   f"`interp jobs {job.job_id}`")
    else:
        _print_job(job)
    if job.state == "failed":
        sys.exit(1)


def _wait_job(conn, job_id: int):
    """A progress bar on stderr until the job leaves queued/running: done, failed, features/s, ETA, tokens."""
    import time

    from tqdm import tqdm

    from interp.store.jobs import ACTIVE, summaries

    job = summaries(conn, job_id)[0]
    with tqdm(total=job.n_items, unit="feat", file=sys.stderr, dynamic_ncols=True, desc=f"job {job_id}") as bar:
        while True:
            bar.update(job.n_done + job.n_failed - bar.n)
            bar.set_postfix(done=job.n_done, failed=job.n_failed, tokens=job.tokens, refresh=False)
            if job.state not in ACTIVE:
                return job
            time.sleep(0.5)
            job = summaries(conn, job_id)[0]


def _print_job(job) -> None:
    if job.kind == "harvest":
        typer.echo(f"job {job.job_id} [{job.state}] harvest {job.sae}: {job.n_done} of {job.n_items} shards done"
                   + (f"; {job.reason}" if job.reason else ""))
        return
    typer.echo(f"job {job.job_id} [{job.state}] sae {job.sae}: {job.n_done} done, {job.n_failed} failed of "
               f"{job.n_items}; {job.tokens:,} tokens" + (f" of {job.budget_tokens:,}" if job.budget_tokens else "")
               + (f"; {job.reason}" if job.reason else ""))
    for reason, n in job.failures.items():
        typer.echo(f"  failed {n:>6}: {reason}")


@app.command("jobs")
def jobs_cmd(
    target: Optional[str] = typer.Argument(None, help="JOB_ID to show one, or `cancel` followed by JOB_ID"),
    job_id: Optional[int] = typer.Argument(None, help="with cancel: the job to stop"),
    limit: int = typer.Option(50, help="jobs listed"),
    json_out: bool = typer.Option(False, "--json"),
):
    """List labelling and harvest jobs, show one (`interp jobs ID`), or stop one (`interp jobs cancel ID`): its features in
    a worker finish, the rest stay pending for `interp label --resume ID`."""
    from interp.db import connect
    from interp.store.jobs import cancel, summaries

    with connect() as conn:
        if target == "cancel":
            if job_id is None:
                raise InputError("give the job to cancel: interp jobs cancel JOB_ID")
            found = summaries(conn, job_id)
            if not found:
                raise InputError(f"no job {job_id}; `interp jobs` lists them")
            if cancel(conn, job_id) is None:
                raise InputError(f"job {job_id} is {found[0].state} already; nothing to cancel")
            listed = summaries(conn, job_id)
        elif target is not None:
            if not target.isdigit() or job_id is not None:
                raise InputError(f"unknown jobs command {target!r}; use interp jobs [JOB_ID] or interp jobs cancel ID")
            listed = summaries(conn, int(target))
            if not listed:
                raise InputError(f"no job {target}; `interp jobs` lists them")
        else:
            listed = summaries(conn, limit=limit)
    if json_out:
        emit_json(listed[0].model_dump(mode="json") if target is not None else
                  {"jobs": [j.model_dump(mode="json") for j in listed]})
        return
    for j in listed:
        _print_job(j)


@app.command("worker")
def worker_cmd(
    concurrency: Optional[int] = typer.Option(None, help="worker processes (default: one per CPU)"),
    queues: Optional[str] = typer.Option(None, help="comma-separated queues (default: settings.job_queue)"),
    llm_concurrency: Optional[int] = typer.Option(None, "--llm-concurrency", help="LLM calls in flight per process"),
    loglevel: str = typer.Option("INFO", "--loglevel"),
):
    """Start a labelling worker in the foreground: the same as `celery -A workers.app worker`."""
    from interp.settings import get_settings

    if llm_concurrency is not None:
        os.environ["LLM_CONCURRENCY"] = str(llm_concurrency)
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", loglevel,
           "-Q", queues or get_settings().job_queue, "--without-gossip", "--without-mingle"]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    sys.stdout.flush()
    os.execv(cmd[0], cmd)   # become the worker: signals reach it directly


# ---------------------------------------------------------------- catalog


# ---------------------------------------------------------------- search + export (issue 10)
@app.command("search")
def search_cmd(
    text: str = typer.Argument(..., help="what the label says: words, a phrase, a typo or a synonym"),
    sae: Optional[str] = typer.Option(None, help="only this SAE"),
    scorer: Optional[str] = typer.Option(None, help="simulation | detection | fuzzing | embedding"),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="only labels with a score >= X"),
    density: Optional[str] = typer.Option(None, help="A:B, feature density between A and B"),
    limit: int = typer.Option(20, help="results shown"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Find features by what their labels say: full text, trigram (typos) and MiniLM (synonyms), fused."""
    from interp.db import connect
    from interp.search import search

    with connect() as conn:
        results = search(conn, text, sae=sae, scorer=scorer, min_score=min_score, density=density, limit=limit,
                         warn=lambda line: typer.echo(f"note: {line}", err=True))
    if json_out:
        emit_json({"results": [r.model_dump(exclude={"relevance"}) for r in results]})
        return
    from interp.render_search import print_results

    print_results(results)


@app.command("export")
def export_cmd(
    sae: str = typer.Option(..., help="SAE name in the catalog"),
    fmt: str = typer.Option(..., "--format", help="jsonl | parquet | csv | neuronpedia"),
    out: str = typer.Option(..., help="output file (a folder for neuronpedia)"),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="only labels with a score >= X"),
    scorer: Optional[str] = typer.Option(None, help="the scorer that --min-score and the score columns use"),
    with_examples: bool = typer.Option(False, "--with-examples", help="add the top snippets (tokens, activations)"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Export an SAE's scored catalog, streamed; the file appears only when complete."""
    from interp.db import connect
    from interp.export import export

    with connect() as conn:
        summary = export(conn, sae, fmt, out, min_score=min_score, scorer=scorer, with_examples=with_examples)
    if json_out:
        emit_json(summary.model_dump())
    else:
        typer.echo(f"wrote {summary.features:,} features, {summary.explanations:,} labels to {summary.path} "
                   f"({summary.format}, {summary.seconds:.1f}s)")


@app.command("demo")
@config_command(DemoConfig)
def demo(cfg: DemoConfig, quick: bool = typer.Option(False, "--quick", help="small sizes (the CI test's); same steps")):
    """The whole service end to end on the embedded defaults: services, schema, a MiniLM SAE trained and evaluated,
    harvested into Postgres, labelled by Celery workers (baseline + an LLM), then the best features, a search and
    the dashboard's URL. A second run skips what is done."""
    from interp.demo import run

    run(cfg.quick() if quick else cfg)


# ---------------------------------------------------------------- serve (issue 11)
@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="listen address (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, help="listen port"),
    workers: int = typer.Option(1, help="uvicorn worker processes, each with its own connection pool"),
):
    """Serve the HTTP API (OpenAPI at /docs) and the dashboard at /. Writes need INTERP_API_TOKEN; reads need
    INTERP_API_READ_TOKEN when it is set."""
    import uvicorn

    from interp.settings import get_settings

    if not 0 < port < 65536:
        raise InputError(f"--port must be 1..65535, got {port}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    s = get_settings()
    typer.echo(f"serving http://{host}:{port}/ (API docs at /docs); writes "
               + ("need the bearer token INTERP_API_TOKEN" if s.write_token() else
                  "are disabled (INTERP_API_TOKEN is not set)")
               + ("; reads need INTERP_API_READ_TOKEN" if s.read_token() else "; reads are open"))
    sys.stdout.flush()
    uvicorn.run("interp.api:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", access_log=True)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers is optional for most commands' speed, not correctness
        pass
    try:
        app()
    except InputError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        from interp.errors import describe

        line = describe(e)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
