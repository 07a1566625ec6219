"""Evaluate an SAE on held-out contexts: FVU, L0, dead and dense fractions; CE-loss score and KL for causal LMs.

FVU is Σ‖x − x̂‖² / Σ‖x − x̄‖² over the whole eval set. The denominator is accumulated in one pass with
Chan's pairwise merge of (count, mean, M2) in float64, so a large common offset in the activations (the
residual stream's mean is often many times its spread) does not cancel the variance away.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .corpus import batches, iter_contexts
from .errors import InputError
from .formats import load_sae, read_cfg
from .models import content_mask, hooked, is_causal, pick_device

DENSE_ABOVE = 0.10  # a latent firing on more than this fraction of tokens counts as dense


@dataclass
class Moments:
    """Running count, mean and Σ‖x − mean‖² of row vectors, merged batch by batch (Chan et al.)."""
    n: int = 0
    mean: torch.Tensor | None = None
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = float((x - mean_b).pow(2).sum())
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n_b / n
        self.mean = self.mean + delta * (n_b / n)
        self.n = n


def fvu_from_sums(sse: float, total_m2: float) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖²; NaN when the inputs have no variance at all."""
    return sse / total_m2 if total_m2 > 0 else math.nan


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float | None:
    """Fraction of the CE increase from zero-ablating the site that splicing in the SAE recovers."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if abs(gap) > 1e-9 else None


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position CE [batch, seq-1] of predicting token t+1 from position t."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def _kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per position [batch, seq]."""
    lp, lq = clean.log_softmax(-1), other.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def evaluate(path: str, corpus: str = "builtin", tokens: int = 50_000, model: str | None = None,
             layer: int | None = None, site: str | None = None, device: str = "auto", batch_size: int = 16,
             seed: int | None = None, progress: bool = True) -> dict:
    """Metrics over `tokens` held-out tokens (whole contexts, so up to one context more).

    The held-out split depends on the corpus order, so `seed` defaults to the one the SAE was trained with."""
    if tokens <= 0:
        raise InputError(f"--tokens must be positive, got {tokens}")
    dev = pick_device(device)
    sae = load_sae(path, device=dev)
    c = sae.cfg
    model_name = model or c.model
    if not model_name:
        raise InputError(f"the SAE at {path} does not record its model; give --model (and --layer, --site)")
    if seed is None:
        seed = int(read_cfg(path).get("seed") or 0)
    layer = c.layer if layer is None else layer
    site = site or c.site
    hm = hooked(model_name, layer, site, device=str(dev))
    if hm.d_in != c.d_in:
        raise InputError(f"SAE d_in {c.d_in} does not match model {model_name} layer {layer} site {site} "
                         f"(d={hm.d_in}); give the --model/--layer/--site it was trained on")
    causal = is_causal(hm.model)

    moments, sse, l0_sum, n_tok = Moments(), 0.0, 0.0, 0
    fire_counts = torch.zeros(c.n_latents, dtype=torch.float64, device=dev)
    ce_sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum, n_pred, n_kl = 0.0, 0, 0
    bar = tqdm(total=tokens, unit="tok", desc="eval", disable=not progress, dynamic_ncols=True)
    contexts = iter_contexts(corpus, hm.tokenizer, ctx_len=c.ctx_len, seed=seed, split="eval")
    for batch in batches(contexts, batch_size):
        mask = content_mask(batch, hm.tokenizer)
        # only as many contexts as the token budget needs
        keep = int((mask.sum(1).cumsum(0) < tokens - n_tok).sum()) + 1
        batch, mask = batch[:keep].to(dev), mask[:keep].to(dev)
        with torch.no_grad():
            if causal:
                captured = {}

                def capture(x):
                    captured["x"] = x
                    return x

                clean_logits = hm.logits_with(batch, replace=capture)
                acts = captured["x"].float()
            else:
                acts = hm.activations(batch)
            x = acts[mask]
            # sparse (values, indices): a dense [tokens, latents] matrix would not fit for wide SAEs
            vals, idx = sae.encode_sparse(x)
            recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals.to(sae.W_dec.dtype), mode="sum") \
                + sae.b_dec

        moments.update(x)
        sse += float((x.double() - recon.double()).pow(2).sum())
        fired = vals > 0
        l0_sum += float(fired.sum())
        fire_counts += torch.bincount(idx[fired], minlength=c.n_latents)
        n_tok += x.shape[0]

        if causal:
            spliced = acts.clone()
            spliced[mask] = recon.to(acts.dtype)
            zeroed = torch.where(mask[..., None], torch.zeros_like(acts), acts)
            # one [batch, seq, vocab] logits tensor besides the clean one at a time: vocabularies are large
            ce_sums["clean"] += float(_next_token_ce(clean_logits, batch).double().sum())
            logits = hm.logits_with(batch, replace=lambda _x: spliced)
            ce_sums["sae"] += float(_next_token_ce(logits, batch).double().sum())
            kl_sum += float(_kl(clean_logits, logits)[mask].double().sum())
            del logits, clean_logits
            logits = hm.logits_with(batch, replace=lambda _x: zeroed)
            ce_sums["zero"] += float(_next_token_ce(logits, batch).double().sum())
            del logits
            n_pred += batch.shape[0] * (batch.shape[1] - 1)
            n_kl += int(mask.sum())

        bar.update(x.shape[0])
        bar.set_postfix(fvu=f"{fvu_from_sums(sse, moments.m2):.4f}", l0=f"{l0_sum / max(n_tok, 1):.1f}")
        if n_tok >= tokens:
            break
    bar.close()
    if n_tok < tokens:
        tqdm.write(f"warning: the held-out split of {corpus!r} holds only {n_tok} tokens, fewer than --tokens "
                   f"{tokens}", file=sys.stderr)

    out = {
        "fvu": fvu_from_sums(sse, moments.m2),
        "l0": l0_sum / n_tok,
        "dead_frac": float((fire_counts == 0).double().mean()),
        "dense_frac": float((fire_counts / n_tok > DENSE_ABOVE).double().mean()),
        "tokens": n_tok,
        "model": model_name, "layer": layer, "site": site, "arch": c.arch, "n_latents": c.n_latents,
    }
    if causal:
        ce = {k: v / n_pred for k, v in ce_sums.items()}
        out.update(ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero_ablation=ce["zero"],
                   ce_loss_score=ce_loss_score(ce["clean"], ce["sae"], ce["zero"]), kl_div=kl_sum / n_kl)
    return out

