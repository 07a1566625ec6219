"""The configs of the jobs in `sae`: each is one frozen dataclass holding its fields, defaults, help and checks.

They are also the CLI: `interp sae train` and `interp harvest` derive their flags from these fields
(sae/cli_config.py). This module imports nothing heavy, so `interp --help` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cli_config import flag_of, opt
from .errors import InputError


def default_batch_tokens(tokens: int) -> int:
    """About tokens/400, a power of two in 512..4096: short runs still take a few hundred steps."""
    return int(min(4096, max(512, 2 ** round(math.log2(max(tokens, 1) / 400)))))


@dataclass(frozen=True)
class TrainConfig:
    """A training run. The fields are also the flags of `interp sae train` (sae/cli_config.py)."""
    model: str = opt(help="Hugging Face id or local path, or 'minilm'")
    layer: int = opt(help="block index")
    corpus: str = opt("builtin", "builtin | FILE/DIR (.txt/.jsonl) | hf:NAME[:SPLIT]")
    latents: int = opt(4096, "number of SAE latents", cli_required=True)
    k: int = opt(32, "active latents per token (TopK/BatchTopK), target L0 for the others")
    tokens: int = opt(1_000_000, "training tokens", cli_required=True)
    out: str = opt("runs/sae", "output directory", cli_required=True)
    site: str = opt("resid", "resid | mlp | attn")
    arch: str = opt("topk", "topk | batchtopk | jumprelu | relu")
    device: str = opt("auto", "cpu | cuda | auto")
    ctx_len: int = opt(128, "length of the corpus contexts the model reads")
    batch_tokens: int | None = opt(None, "tokens per optimiser step (default: about tokens/400, a power of two "
                                         "in 512..4096, so short runs still take a few hundred steps)")
    lr: float | None = opt(None, "learning rate (default scales with latents and tokens)")
    seed: int = opt(0, "corpus order and initialisation")
    resume: bool = opt(False, "continue from the checkpoint in --out")
    buffer_tokens: int = opt(65_536, "shuffle buffer: each batch mixes about buffer_tokens/ctx_len contexts")
    warmup_steps: int = opt(100, "linear learning-rate warmup steps")
    decay_frac: float = opt(0.5, "linear decay to zero over this last fraction of the steps")
    dead_tokens: int | None = opt(None, "a latent is dead after this many tokens unfired (default scales with "
                                        "tokens)")
    checkpoint_every: int = opt(500, "steps between checkpoints")
    max_steps: int | None = opt(None, "stop (with a checkpoint, no final SAE) after this many steps; resume later")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if self.batch_tokens is None:  # frozen: the derived default is set once, here
            object.__setattr__(self, "batch_tokens", default_batch_tokens(self.tokens))
        self._check()

    def _check(self) -> None:
        """Everything that can be checked without loading the model or touching the disk."""
        from .archs import ARCHS
        from .models import SITES

        for name in ("latents", "k", "tokens", "batch_tokens", "ctx_len", "buffer_tokens", "checkpoint_every"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{flag_of(TrainConfig, name)} must be a positive integer, got {getattr(self, name)}")
        if self.k >= self.latents:
            raise InputError(f"--k ({self.k}) must be smaller than --latents ({self.latents})")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.layer < 0:
            raise InputError(f"--layer must be 0 or more, got {self.layer}")
        if self.arch not in ARCHS:
            raise InputError(f"unknown --arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.site not in SITES:
            raise InputError(f"unknown --site {self.site!r}; valid sites: {', '.join(SITES)}")
        if self.tokens < self.batch_tokens:
            raise InputError(f"--tokens ({self.tokens}) must be at least --batch-tokens ({self.batch_tokens})")

    @property
    def base_lr(self) -> float:
        """sparsify's 2e-4 / sqrt(latents / 16384) for runs of 10M tokens and more; shorter runs take fewer
        steps and get larger ones, ~1/sqrt(tokens), up to 8x (measured on MiniLM at 200k tokens, README)."""
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.latents / 16384) * min(8.0, max(1.0, math.sqrt(1e7 / self.tokens)))

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_tokens)

    @property
    def dead_after(self) -> int:
        # 10M tokens for real runs (Gao et al.); a short run scales it down so AuxK still gets to act
        return self.dead_tokens or min(10_000_000, max(self.tokens // 20, 2 * self.batch_tokens))


@dataclass(frozen=True)
class HarvestConfig:
    """What a harvest keeps per feature. The fields are also the flags of `interp harvest` (sae/cli_config.py)."""
    top_k: int = opt(50, "top-activating contexts kept per feature", flag="--top")
    window: int = opt(32, "window width shown around each example's max", flag="--ctx")
    ctx_len: int = opt(64, "length of the corpus contexts the model reads")
    n_bins: int = opt(10, "equal-width activation bins for the quantile samples")
    per_bin: int = opt(5, "quantile samples per bin")
    n_random: int = opt(20, "random non-firing contexts per feature and split")
    reservoir: int = opt(64, "hashed token sample per feature feeding the quantile bins")
    pool: int = opt(256, "random contexts kept for the non-firing examples")
    hist_bins: int = opt(50, "activation histogram bins")
    n_logits: int = opt(10, "top and bottom logit tokens per feature (causal LMs)")
    seed: int = opt(0, "key of the sampling hashes")

    def __post_init__(self):
        if self.window < 2 or self.top_k < 2:
            raise InputError(f"--ctx and --top must be at least 2, got --ctx {self.window} --top {self.top_k}")
        if self.window > self.ctx_len:
            raise InputError(f"--ctx {self.window} is longer than the harvest contexts (--ctx-len {self.ctx_len}); "
                             "give --ctx <= --ctx-len")
        for name in ("n_bins", "per_bin", "reservoir", "pool", "hist_bins"):
            if getattr(self, name) < 1:
                raise InputError(f"{flag_of(HarvestConfig, name)} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        for name in ("n_random", "n_logits"):
            if getattr(self, name) < 0:
                raise InputError(f"{flag_of(HarvestConfig, name)} must be 0 or more, got {getattr(self, name)}")
