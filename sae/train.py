"""Train an SAE on a model's activations at one hook site.

Activations stream from the corpus's train split through the model (stopped at the site), skipping the
CLS/BOS position, into a shuffle buffer that mixes hundreds of contexts per batch. They are scaled to a mean
norm of sqrt(d) (scale estimated on the first chunk) and the scale is folded into the saved weights.
A checkpoint in OUT/checkpoint/ holds everything needed to continue bit-for-bit: weights, Adam state, step,
tokens, scale, dead-latent counters, the corpus position, the unread part of the buffer and its RNG.
OUT gets cfg.json only when training finishes, so an unfinished run never looks like an SAE.

Multi-GPU: under torchrun (WORLD_SIZE > 1) every rank reads the same global batch (the activation stream is
deterministic), trains on its own contiguous slice, and gradients are summed with all_reduce. The FVU
denominator is the global batch's variance, so the summed gradient equals the single-process one.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .archs import SAEConfig, SparseAutoencoder, build
from .configs import TrainConfig
from .errors import InputError, first_line
from .optim import adam

CKPT_DIR, CKPT_FILE = "checkpoint", "state.pt"


def check_out_dir(cfg: TrainConfig) -> None:
    """The checks that look at the disk, made before anything is written."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; give a directory path")
    if cfg.resume and not (out / CKPT_DIR / CKPT_FILE).exists():
        raise InputError(f"--resume: no checkpoint at {out / CKPT_DIR / CKPT_FILE}; run without --resume to start")


# ---------------------------------------------------------------- pure math
def lr_at(step: int, total: int, base: float, warmup: int, decay_frac: float) -> float:
    """Linear warmup, constant, then linear decay to zero over the last decay_frac of the steps."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(total * (1 - decay_frac))
    if step >= decay_start:
        return base * max(total - step, 0) / max(total - decay_start, 1)
    return base


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance; robust to the outlier tokens."""
    med = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - med).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - med).norm() < eps * med.norm().clamp_min(1.0):
            return new
        med = new
    return med


# ---------------------------------------------------------------- activations
class ActivationStream:
    """Batches of activations, shuffled across chunks of ~buffer_tokens from many contexts."""

    def __init__(self, hm, cfg: TrainConfig, skip_contexts: int = 0):
        from .corpus import iter_contexts

        self.hm, self.cfg = hm, cfg
        self.contexts = iter_contexts(cfg.corpus, hm.tokenizer, cfg.ctx_len, seed=cfg.seed, split="train",
                                      skip=skip_contexts)
        self.consumed = skip_contexts
        self.pending = torch.empty(0, hm.d_in, device=hm.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.model_batch = max(1, 4096 // cfg.ctx_len)
        self.exhausted = False

    def _read_chunk(self) -> torch.Tensor:
        from .models import content_mask

        parts, n = [], 0
        while n < self.cfg.buffer_tokens and not self.exhausted:
            ctxs = []
            for ctx in self.contexts:
                ctxs.append(ctx)
                if len(ctxs) == self.model_batch:
                    break
            if len(ctxs) < self.model_batch:
                self.exhausted = True
            if not ctxs:
                break
            self.consumed += len(ctxs)
            tokens = torch.tensor(ctxs, dtype=torch.long)
            acts = self.hm.activations(tokens)[content_mask(tokens, self.hm.tokenizer).to(self.hm.device)]
            parts.append(acts)
            n += acts.shape[0]
        return torch.cat(parts) if parts else self.pending[:0]

    def next_batch(self) -> torch.Tensor | None:
        """[batch_tokens, d] raw activations, or None once the corpus cannot fill another batch."""
        b = self.cfg.batch_tokens
        while self.pending.shape[0] < b and not self.exhausted:
            both = torch.cat([self.pending, self._read_chunk()])
            self.pending = both[torch.randperm(both.shape[0], generator=self.gen).to(both.device)]
        if self.pending.shape[0] < b:
            return None
        batch, self.pending = self.pending[:b], self.pending[b:]
        return batch

    def peek(self, n: int) -> torch.Tensor:
        """Up to n raw activations from the front of the buffer (filling it), without consuming them."""
        while self.pending.shape[0] < n and not self.exhausted:
            both = torch.cat([self.pending, self._read_chunk()])
            self.pending = both[torch.randperm(both.shape[0], generator=self.gen).to(both.device)]
        return self.pending[:n]

    def state(self) -> dict:
        return {"consumed": self.consumed, "pending": self.pending.cpu().clone(), "gen": self.gen.get_state(),
                "exhausted": self.exhausted}

    def load(self, state: dict) -> None:
        self.pending = state["pending"].to(self.hm.device)
        self.gen.set_state(state["gen"])
        self.exhausted = state["exhausted"]


# ---------------------------------------------------------------- the optimisation
@dataclass
class StepStats:
    fvu: float
    l0: float
    dead_frac: float
    lr: float


class Trainer:
    """One SAE, its Adam state and its dead-latent counters; `step` takes one global batch (already scaled)."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.sae, self.cfg, self.rank, self.world = sae, cfg, rank, world
        dev = sae.W_enc.device
        self.opt = adam(sae, cfg.base_lr)
        self.step_n = 0
        self.tokens_seen = 0
        self.since_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=dev)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    @staticmethod
    def _sum_grads(sae) -> None:
        """Sums the gradients over the ranks. Every rank must run the same collectives in the same order, and a
        parameter can have a gradient on one rank and none on another (a term that only some ranks' batches
        reach), so which parameters have one is agreed first; those get summed, zeros standing in where a rank
        has none, exactly the single-process gradient of the whole batch."""
        params = list(sae.parameters())
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for p, any_rank in zip(params, has.tolist()):
            if any_rank:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_after

    def step(self, x: torch.Tensor) -> StepStats:
        cfg, sae = self.cfg, self.sae
        lr = lr_at(self.step_n, cfg.total_steps, cfg.base_lr, cfg.warmup_steps, cfg.decay_frac)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total_var = (x - x.mean(0)).pow(2).sum()
        mine = x.chunk(self.world)[self.rank] if self.world > 1 else x
        with self.autocast:
            out = sae.training_step(mine, dead=self.dead(), total_var=total_var, n_total=x.shape[0])
        out.loss.backward()
        fired = out.fired.to(torch.uint8)
        sums = torch.stack([out.fvu.detach().float(), out.l0.detach().float() * mine.shape[0]])
        if self.world > 1:
            self._sum_grads(sae)
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            dist.all_reduce(sums)
        self.opt.step()  # the decoder's gradient projection and unit norm included (sae.optim)
        self.opt.zero_grad(set_to_none=True)
        self.since_fired += x.shape[0]
        self.since_fired[fired.bool()] = 0
        self.step_n += 1
        self.tokens_seen += x.shape[0]
        fvu, l0_sum = sums.tolist()
        sae.after_step(l0_sum / x.shape[0])
        return StepStats(fvu, l0_sum / x.shape[0], float(self.dead().float().mean()), lr)

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step_n,
                "tokens_seen": self.tokens_seen, "since_fired": self.since_fired.cpu()}

    def load(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step_n, self.tokens_seen = state["step"], state["tokens_seen"]
        self.since_fired.copy_(state["since_fired"])


# ---------------------------------------------------------------- checkpoints
# fields that must agree between a checkpoint and the run resuming it
_RESUME_KEYS = ("model", "layer", "site", "corpus", "latents", "k", "arch", "ctx_len", "batch_tokens", "seed",
                "buffer_tokens")


def save_checkpoint(out: Path, trainer: Trainer, stream: ActivationStream, scale: float, cfg: TrainConfig) -> None:
    d = out / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{CKPT_FILE}.tmp"
    torch.save({"trainer": trainer.state(), "stream": stream.state(), "scale": scale, "cfg": asdict(cfg),
                "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, d / CKPT_FILE)


def load_checkpoint(out: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(out / CKPT_DIR / CKPT_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a damaged file
        raise InputError(f"cannot read checkpoint {out / CKPT_DIR / CKPT_FILE}: {first_line(e)[:150]}") from None
    diff = [f"{k}={state['cfg'][k]!r}" for k in _RESUME_KEYS if state["cfg"].get(k) != getattr(cfg, k)]
    if diff:
        raise InputError(f"--resume: the checkpoint in {out} was made with {', '.join(diff)}; "
                         "give the same settings or a new --out")
    return state


# ---------------------------------------------------------------- the run
def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_distributed(cfg: TrainConfig) -> tuple[int, int, str]:
    """(rank, world, device); under torchrun each rank takes its local GPU and joins the process group."""
    rank, world, local_rank = _distributed()
    device = cfg.device
    if world > 1:
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def _first_sample(stream: ActivationStream, cfg: TrainConfig) -> torch.Tensor:
    """The activations a fresh run calibrates on; reading them is the corpus's first use, so an empty or
    missing corpus fails here, before OUT is touched."""
    sample = stream.peek(8192)
    if sample.shape[0] < cfg.batch_tokens:
        raise InputError(f"corpus {cfg.corpus!r} yields only {sample.shape[0]} training tokens, fewer than "
                         f"--batch-tokens {cfg.batch_tokens}; give a larger corpus or a smaller batch")
    return sample


def _start_fresh(sae: SparseAutoencoder, sample: torch.Tensor, out: Path, rank: int) -> float:
    """Input scale, b_dec at the geometric median and the architecture's calibration; clears an earlier
    run's files. Returns the scale."""
    scale = math.sqrt(sae.cfg.d_in) / float(sample.norm(dim=1).mean().clamp_min(1e-12))
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    sae.calibrate(sample * scale)
    if rank == 0 and out.exists():
        # a fresh run replaces an earlier one here: it must not look finished while this one runs
        for name in ("cfg.json", "sae.safetensors", f"{CKPT_DIR}/{CKPT_FILE}"):
            (out / name).unlink(missing_ok=True)
    return scale


def _loop(trainer: Trainer, stream: ActivationStream, scale: float, cfg: TrainConfig, out: Path,
          rank: int) -> tuple[list[StepStats], bool]:
    """Steps until the token budget, max_steps or the corpus runs out, checkpointing every
    checkpoint_every steps. Returns the last 20 steps' stats and whether max_steps stopped it early."""
    bar = tqdm(total=cfg.tokens, initial=min(trainer.tokens_seen, cfg.tokens), unit="tok", unit_scale=True,
               desc=f"train {cfg.arch} L{cfg.layer}", disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               file=sys.stderr)
    recent: list[StepStats] = []
    stopped_early = False
    trainer.sae.train()
    while trainer.tokens_seen + cfg.batch_tokens <= cfg.tokens:
        if cfg.max_steps is not None and trainer.step_n >= cfg.max_steps:
            stopped_early = True
            break
        x = stream.next_batch()
        if x is None:
            tqdm.write(f"warning: corpus {cfg.corpus!r} ran out after {trainer.tokens_seen} training tokens",
                       file=sys.stderr)
            break
        stats = trainer.step(x * scale)
        recent = (recent + [stats])[-20:]
        bar.update(x.shape[0])
        bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", dead=f"{stats.dead_frac:.3f}",
                        refresh=False)
        if rank == 0 and trainer.step_n % cfg.checkpoint_every == 0:
            save_checkpoint(out, trainer, stream, scale, cfg)
    bar.close()
    return recent, stopped_early


def _save_final(trainer: Trainer, scale: float, cfg: TrainConfig, out: Path) -> None:
    """The trained SAE with the input scale folded in, on the CPU, as a native SAE directory."""
    from .formats import save_native

    sae = trainer.sae
    final = build(sae.cfg, device="cpu")
    final.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()})
    final.fold_input_scale(scale)
    save_native(final, out, extra={"seed": cfg.seed, "corpus": cfg.corpus, "tokens": trainer.tokens_seen,
                                   "input_scale": scale, "lr": cfg.base_lr, "batch_tokens": cfg.batch_tokens})


def train(cfg: TrainConfig) -> dict:
    """Train and save the SAE into cfg.out; returns a summary (tokens, seconds, fvu, l0, dead_frac, out)."""
    from .models import hooked

    check_out_dir(cfg)
    rank, world, device = _init_distributed(cfg)
    torch.manual_seed(cfg.seed)
    hm = hooked(cfg.model, cfg.layer, cfg.site, device=device)
    out = Path(cfg.out)
    state = load_checkpoint(out, cfg) if cfg.resume else None
    stream = ActivationStream(hm, cfg, skip_contexts=state["stream"]["consumed"] if state else 0)
    if state:
        stream.load(state["stream"])
    else:
        sample = _first_sample(stream, cfg)
    sae = build(SAEConfig(d_in=hm.d_in, n_latents=cfg.latents, arch=cfg.arch, k=cfg.k, model=cfg.model,
                          layer=cfg.layer, site=cfg.site, ctx_len=cfg.ctx_len), device=hm.device)
    trainer = Trainer(sae, cfg, rank, world)
    if state:
        trainer.load(state["trainer"])
        torch.set_rng_state(state["rng"])
        scale = state["scale"]
    else:
        scale = _start_fresh(sae, sample, out, rank)

    t0 = time.perf_counter()
    recent, stopped_early = _loop(trainer, stream, scale, cfg, out, rank)
    seconds = time.perf_counter() - t0
    if rank == 0:
        save_checkpoint(out, trainer, stream, scale, cfg)
    summary = {"tokens": trainer.tokens_seen, "steps": trainer.step_n, "seconds": round(seconds, 2),
               "fvu": round(sum(s.fvu for s in recent) / max(len(recent), 1), 4),
               "l0": round(sum(s.l0 for s in recent) / max(len(recent), 1), 2),
               "dead_frac": round(float(trainer.dead().float().mean()), 4), "scale": scale,
               "out": str(out), "finished": not stopped_early}
    if rank == 0 and not stopped_early:
        _save_final(trainer, scale, cfg, out)
    if world > 1:
        dist.barrier()
    return summary
