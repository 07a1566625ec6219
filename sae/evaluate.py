"""Evaluate an SAE on held-out contexts: FVU, L0, dead and dense fractions; CE-loss score and KL for causal LMs.

FVU is Σ‖x − x̂‖² / Σ‖x − x̄‖² over the whole eval set. The denominator is accumulated in one pass with
Chan's pairwise merge of (count, mean, M2) in float64, so a large common offset in the activations (the
residual stream's mean is often many times its spread) does not cancel the variance away.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

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


@dataclass
class _Totals:
    """Sums over the eval tokens so far; the metrics are ratios of them."""
    n_latents: int
    device: torch.device
    moments: Moments = field(default_factory=Moments)
    sse: float = 0.0
    l0_sum: float = 0.0
    n_tok: int = 0
    fire_counts: torch.Tensor | None = None
    ce_sums: dict = field(default_factory=lambda: {"clean": 0.0, "sae": 0.0, "zero": 0.0})
    kl_sum: float = 0.0
    n_pred: int = 0
    n_kl: int = 0

    def __post_init__(self):
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.float64, device=self.device)

    def add_reconstruction(self, x, vals, idx, recon) -> None:
        self.moments.update(x)
        self.sse += float((x.double() - recon.double()).pow(2).sum())
        fired = vals > 0
        self.l0_sum += float(fired.sum())
        self.fire_counts += torch.bincount(idx[fired], minlength=self.n_latents)
        self.n_tok += x.shape[0]

    def metrics(self) -> dict:
        return {"fvu": fvu_from_sums(self.sse, self.moments.m2), "l0": self.l0_sum / self.n_tok,
                "dead_frac": float((self.fire_counts == 0).double().mean()),
                "dense_frac": float((self.fire_counts / self.n_tok > DENSE_ABOVE).double().mean()),
                "tokens": self.n_tok}

    def ce_metrics(self) -> dict:
        ce = {k: v / self.n_pred for k, v in self.ce_sums.items()}
        return dict(ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero_ablation=ce["zero"],
                    ce_loss_score=ce_loss_score(ce["clean"], ce["sae"], ce["zero"]), kl_div=self.kl_sum / self.n_kl)


def _load(path, model, layer, site, device, seed):
    """The SAE, the model hooked where the SAE reads (its own model, layer and site unless overridden), the
    seed, and where it reads as the metrics report it."""
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
    return sae, hm, seed, {"model": model_name, "layer": layer, "site": site}


@torch.no_grad()
def _encode(hm, sae, batch, mask, causal):
    """The site's activations, the content tokens' sparse code and reconstruction, and (causal) clean logits."""
    clean_logits = None
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
    recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals.to(sae.W_dec.dtype), mode="sum") + sae.b_dec
    return acts, x, vals, idx, recon, clean_logits


def _add_ce(totals: _Totals, hm, batch, mask, acts, recon, clean_logits) -> None:
    """Next-token CE with the site clean, spliced with the SAE's reconstruction and zero-ablated; KL to clean."""
    spliced = acts.clone()
    spliced[mask] = recon.to(acts.dtype)
    zeroed = torch.where(mask[..., None], torch.zeros_like(acts), acts)
    # one [batch, seq, vocab] logits tensor besides the clean one at a time: vocabularies are large
    totals.ce_sums["clean"] += float(_next_token_ce(clean_logits, batch).double().sum())
    logits = hm.logits_with(batch, replace=lambda _x: spliced)
    totals.ce_sums["sae"] += float(_next_token_ce(logits, batch).double().sum())
    totals.kl_sum += float(_kl(clean_logits, logits)[mask].double().sum())
    del logits, clean_logits
    logits = hm.logits_with(batch, replace=lambda _x: zeroed)
    totals.ce_sums["zero"] += float(_next_token_ce(logits, batch).double().sum())
    del logits
    totals.n_pred += batch.shape[0] * (batch.shape[1] - 1)
    totals.n_kl += int(mask.sum())


def evaluate(path: str, corpus: str = "builtin", tokens: int = 50_000, model: str | None = None,
             layer: int | None = None, site: str | None = None, device: str = "auto", batch_size: int = 16,
             seed: int | None = None, progress: bool = True) -> dict:
    """Metrics over `tokens` held-out tokens (whole contexts, so up to one context more).

    The held-out split depends on the corpus order, so `seed` defaults to the one the SAE was trained with."""
    if tokens <= 0:
        raise InputError(f"--tokens must be positive, got {tokens}")
    sae, hm, seed, where = _load(path, model, layer, site, device, seed)
    c, dev = sae.cfg, sae.W_dec.device
    causal = is_causal(hm.model)
    totals = _Totals(c.n_latents, dev)
    bar = tqdm(total=tokens, unit="tok", desc="eval", disable=not progress, dynamic_ncols=True)
    contexts = iter_contexts(corpus, hm.tokenizer, ctx_len=c.ctx_len, seed=seed, split="eval")
    for batch in batches(contexts, batch_size):
        mask = content_mask(batch, hm.tokenizer)
        # only as many contexts as the token budget needs
        keep = int((mask.sum(1).cumsum(0) < tokens - totals.n_tok).sum()) + 1
        batch, mask = batch[:keep].to(dev), mask[:keep].to(dev)
        acts, x, vals, idx, recon, clean_logits = _encode(hm, sae, batch, mask, causal)
        totals.add_reconstruction(x, vals, idx, recon)
        if causal:
            _add_ce(totals, hm, batch, mask, acts, recon, clean_logits)
        bar.update(x.shape[0])
        bar.set_postfix(fvu=f"{fvu_from_sums(totals.sse, totals.moments.m2):.4f}",
                        l0=f"{totals.l0_sum / max(totals.n_tok, 1):.1f}")
        if totals.n_tok >= tokens:
            break
    bar.close()
    if totals.n_tok < tokens:
        tqdm.write(f"warning: the held-out split of {corpus!r} holds only {totals.n_tok} tokens, fewer than "
                   f"--tokens {tokens}", file=sys.stderr)
    out = {**totals.metrics(), **where, "arch": c.arch, "n_latents": c.n_latents}
    if causal:
        out.update(totals.ce_metrics())
    return out
