"""Parity and inference speed: eai-sparsify's SparseCoder vs ours on the same directory, both directions.

    flock /tmp/bench.lock python bench/sparsify_parity.py [--d 384 --latents 4096 --k 16 --tokens 16384]

Inputs are real MiniLM layer-3 residual activations from the builtin corpus (held-out split), so the
comparison runs where an SAE is used. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch


def sparsify_classes():
    """SparseCoder without sparsify's package __init__, which imports `datasets` for training only."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None:
        sys.exit("eai-sparsify is not installed: pip install --no-deps eai-sparsify==1.3.3 natsort "
                 "simple-parsing docstring-parser einops accelerate")
    if not torch.cuda.is_available():
        # sparsify takes its Triton decoder whenever triton imports, and that one needs a GPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    pkg = types.ModuleType("sparsify")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = pkg
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    return SparseCoder, SparseCoderConfig


def activations(n_tokens: int) -> torch.Tensor:
    from sae.corpus import batches, iter_contexts
    from sae.models import content_mask, hooked

    hm = hooked("minilm", 3, "resid", device="cpu")
    parts, n = [], 0
    for batch in batches(iter_contexts("builtin", hm.tokenizer, 128, split="eval"), 16):
        parts.append(hm.activations(batch)[content_mask(batch, hm.tokenizer)])
        n += parts[-1].shape[0]
        if n >= n_tokens:
            break
    return torch.cat(parts)[:n_tokens]


def timed(fn, x: torch.Tensor, chunk: int = 4096, repeats: int = 3) -> float:
    """Best-of-repeats tokens/s of fn over x in chunks."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for part in x.split(chunk):
            fn(part)
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from sae.archs import SAEConfig, build
    from sae.formats import load_sae, save_sparsify

    SparseCoder, SparseCoderConfig = sparsify_classes()
    x = activations(args.tokens)
    d = x.shape[1]
    torch.manual_seed(0)
    theirs = SparseCoder(d, SparseCoderConfig(num_latents=args.latents, k=args.k))
    theirs.b_dec.copy_(x.mean(0))
    theirs.encoder.bias.normal_(0, 0.05)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # theirs -> disk -> ours
        theirs.save_to_disk(Path(tmp) / "theirs")
        ours = load_sae(Path(tmp) / "theirs")
        # ours -> disk -> theirs
        mine = build(SAEConfig(d_in=d, n_latents=args.latents, k=args.k)).eval()
        mine.b_dec.copy_(x.mean(0))
        save_sparsify(mine, Path(tmp) / "ours")
        back = SparseCoder.load_from_disk(Path(tmp) / "ours")

    def compare(name, a_sparsify, b_ours):
        out = a_sparsify(x)
        dense = torch.zeros(x.shape[0], args.latents).scatter(-1, out.latent_indices, out.latent_acts)
        err_lat = float((dense - b_ours.encode(x)).abs().max())
        err_out = float((out.sae_out - b_ours(x)).abs().max())
        rows.append({"direction": name, "max_abs_latent_diff": err_lat, "max_abs_recon_diff": err_out,
                     "recon_scale": float(out.sae_out.abs().max())})

    compare("sparsify dir -> ours", theirs, ours)
    compare("our export -> sparsify", back, mine)

    def ours_fn(part):
        vals, idx = ours.encode_sparse(part)
        return ours.decode_sparse(vals, idx)

    speed = {"sparsify_tok_s": timed(lambda p: theirs(p).sae_out, x), "ours_tok_s": timed(ours_fn, x)}

    print(f"SAE d={d} latents={args.latents} k={args.k}, {x.shape[0]} MiniLM L3 resid tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'direction':<26}{'max |Δ latent|':>16}{'max |Δ recon|':>16}{'max |recon|':>14}")
    for r in rows:
        print(f"{r['direction']:<26}{r['max_abs_latent_diff']:>16.2e}{r['max_abs_recon_diff']:>16.2e}"
              f"{r['recon_scale']:>14.2f}")
    print(f"inference encode+decode: sparsify {speed['sparsify_tok_s']:,.0f} tok/s, "
          f"ours {speed['ours_tok_s']:,.0f} tok/s")
    print(json.dumps({"bench": "sparsify_parity", "d": d, "latents": args.latents, "k": args.k,
                      "tokens": int(x.shape[0]), "rows": rows, **{k: round(v) for k, v in speed.items()}}))


if __name__ == "__main__":
    main()
