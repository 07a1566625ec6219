"""The one CLI, `interp`. Commands are thin: they parse flags and call into `sae` and `interp` modules.

Each room owns its own section below; keep heavy imports inside the commands so `interp --help` is fast.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

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
def sae_train(
    model: str = typer.Option(..., help="Hugging Face id or local path, or 'minilm'"),
    layer: int = typer.Option(..., help="block index"),
    corpus: str = typer.Option("builtin", help="builtin | FILE/DIR (.txt/.jsonl) | hf:NAME[:SPLIT]"),
    latents: int = typer.Option(..., help="number of SAE latents"),
    k: int = typer.Option(32, help="active latents per token (TopK/BatchTopK), target L0 for the others"),
    tokens: int = typer.Option(..., help="training tokens"),
    out: str = typer.Option(..., help="output directory"),
    site: str = typer.Option("resid", help="resid | mlp | attn"),
    arch: str = typer.Option("topk", help="topk | batchtopk | jumprelu | relu"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    ctx_len: int = typer.Option(128, "--ctx-len"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="tokens per optimiser step"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default scales with latents)"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Train an SAE on a model's activations at one hook site."""
    from sae.train import TrainConfig, train

    cfg = TrainConfig(model=model, layer=layer, site=site, corpus=corpus, latents=latents, k=k, tokens=tokens,
                      out=out, arch=arch, device=device, ctx_len=ctx_len, batch_tokens=batch_tokens, lr=lr,
                      seed=seed, resume=resume)
    summary = train(cfg)
    if json_out:
        emit_json(summary)


@sae_app.command("eval")
def sae_eval(
    path: str = typer.Argument(..., help="SAE directory (native, SAELens or sparsify)"),
    corpus: str = typer.Option("builtin"),
    tokens: int = typer.Option(50_000),
    model: Optional[str] = typer.Option(None, help="override the model recorded in the SAE's config"),
    layer: Optional[int] = typer.Option(None),
    site: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Evaluate an SAE on held-out tokens: FVU, L0, dead and dense fractions, and CE/KL for causal LMs."""
    from sae.evaluate import evaluate

    metrics = evaluate(path, corpus=corpus, tokens=tokens, model=model, layer=layer, site=site, device=device)
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
# ---------------------------------------------------------------- labelling, llm (issue 4)
# ---------------------------------------------------------------- catalog


@app.command("demo")
def demo(
    out: str = typer.Option("runs/demo", help="where the demo SAE goes"),
    tokens: int = typer.Option(200_000),
):
    """Run what exists end to end on the embedded defaults: train and evaluate an SAE on MiniLM."""
    from sae.train import TrainConfig, train
    from sae.evaluate import evaluate

    train(TrainConfig(model="minilm", layer=3, corpus="builtin", latents=2048, k=16, tokens=tokens, out=out))
    metrics = evaluate(out, corpus="builtin", tokens=50_000)
    for key, val in metrics.items():
        typer.echo(f"{key:>16}: {val}")


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
