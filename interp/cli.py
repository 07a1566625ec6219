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
    json_out: bool = typer.Option(False, "--json"),
):
    """Stream a corpus through model and SAE; store each feature's examples and stats in the catalog."""
    from interp.harvest_job import harvest_to_catalog

    summary = harvest_to_catalog(sae, name, corpus, tokens, cfg=cfg, shard=shard, replace=replace, device=device,
                                 batch_size=batch_size, state_dir=state_dir, progress=sys.stderr.isatty())
    if json_out:
        emit_json(summary)
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


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


# ---------------------------------------------------------------- catalog


@app.command("demo")
@config_command(DemoConfig)
def demo(cfg: DemoConfig, quick: bool = typer.Option(False, "--quick", help="small sizes (the CI test's); same steps")):
    """The whole service end to end on the embedded defaults: services, schema, a MiniLM SAE trained and evaluated,
    harvested into Postgres, labelled by Celery workers (baseline + an LLM), then the best features, a search and
    the dashboard's URL. A second run skips what is done."""
    from interp.demo import run

    run(cfg.quick() if quick else cfg)


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
