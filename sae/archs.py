"""SAE architectures: one class per kind behind one interface, found by name in ARCHS.

All kinds share the parameters W_enc [n_latents, d_in], b_enc [n_latents], W_dec [n_latents, d_in], b_dec [d_in]
and encode as act(W_enc (x - b_dec) + b_enc). Only the activation and the sparsity loss differ.

Each kind also owns how the other formats hold it (to_saelens / from_saelens, to_sparsify / from_sparsify) and which
of its numbers decide what fires (firing_sha); sae.formats keeps the files and asks the kind found in a file's cfg.json.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, first_line
from .kernels import Pattern, flat_pattern, sparse_decode, sparse_linear, topk_flat, topk_pattern, topk_rows


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    arch: str = "topk"
    k: int = 32
    # where the SAE reads its input; informational, used by harvest/eval to rebuild the hook
    model: str = ""
    layer: int = 0
    site: str = "resid"
    ctx_len: int = 128
    l1_coef: float = 5.0           # relu: L1 weighted by decoder norm
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    l0_coef: float = 10.0          # jumprelu: weight of ((L0 - k) / k)^2
    jumprelu_threshold_lr: float = 3.0   # jumprelu: log θ's learning rate over the weights' (see param_groups)
    jumprelu_l0_gain: float = 0.2    # jumprelu: every log θ moves by gain x (L0 - k) / k after each step

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise InputError(f"unknown architecture {self.arch!r}; valid: {', '.join(ARCHS)}")
        for name in ("d_in", "n_latents", "k"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.k >= self.n_latents:
            raise InputError(f"k ({self.k}) must be smaller than the number of latents ({self.n_latents})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StepOutput:
    """What one training forward produces: the loss to minimise and the numbers the progress bar shows."""
    loss: torch.Tensor
    recon: torch.Tensor
    fvu: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor                   # [n_latents] bool: latents that fired in this batch
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


def config_int(cfg: dict, key: str, where: Path, found: object = None) -> int:
    """`found`, else cfg[key], as an integer; else an error naming the file `where`."""
    try:
        return int(found if found is not None else cfg[key])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where} has no integer {key!r}") from None


@dataclass(frozen=True)
class Stored:
    """One SAE as a file format holds it, with the parts every kind reads alike already in our terms."""
    cfg: dict                            # the cfg.json as read
    weights: dict[str, torch.Tensor]     # W_enc [n, d], b_enc, W_dec, b_dec in our layout, whatever the file calls them
    extra: dict[str, torch.Tensor]       # the file's other tensors under the file's names (SAELens' threshold)
    common: dict                         # SAEConfig fields that do not depend on the kind: d_in, n_latents, where
    cfg_path: Path
    weights_path: Path

    def integer(self, key: str, found: object = None) -> int:
        return config_int(self.cfg, key, self.cfg_path, found)

    def build(self, arch: str, k: int, **extra: torch.Tensor) -> SparseAutoencoder:
        return load_state(SAEConfig(**self.common, arch=arch, k=k), {**self.weights, **extra}, self.weights_path)


def _stand_in_k(n_latents: int) -> int:
    """SAEConfig needs a k. For the threshold and L1 kinds it is only the training target, which a foreign file
    does not record; neither encode nor firing_sha reads it."""
    return min(32, n_latents - 1)


def threshold_of(log_threshold: torch.Tensor) -> torch.Tensor:
    """exp in float64, rounded once to float32. float32 exp kernels differ in the last bit between devices and
    between vector and scalar loops, so this is the one threshold written to files and hashed."""
    return log_threshold.detach().double().exp().float()


def log_threshold_of(threshold: torch.Tensor) -> torch.Tensor:
    """The float32 log whose threshold_of gives `threshold` back whenever some float32 log does (the nearest
    float32 to the exact log is at least as close as any other)."""
    return threshold.detach().double().clamp_min(1e-12).log().float()


def _total_var(x: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
    """FVU's denominator: squared distance to the batch mean, summed (not the mean of per-token ratios)."""
    return (given if given is not None else (x - x.mean(0)).pow(2).sum()).clamp_min(1e-12)


def auxk_loss(sae: "SparseAutoencoder", xc, pre, err, dead, total_var) -> torch.Tensor:
    """AuxK (Gao et al.): the dead latents' top activations must explain the residual error `err`. Unlike
    sparsify, the gradient also reaches the encoder, so dead latents can move toward the data. xc is the
    input less b_dec, pre its pre-activations (read without gradient)."""
    n_dead = 0 if dead is None else int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), device=xc.device)
    k_aux = min(xc.shape[-1] // 2, n_dead)
    with torch.no_grad():
        vals, idx = pre.detach().masked_fill(~dead[None], -torch.inf).topk(k_aux, dim=-1, sorted=False)
        pattern = topk_pattern(idx, pre.shape[1])
    aux_acts = sparse_linear(xc, sae.W_enc, sae.b_enc, pattern, vals.reshape(-1)).relu()
    aux_recon = sparse_decode(aux_acts, sae.W_dec, pattern)
    scale = min(n_dead / (xc.shape[-1] // 2), 1.0)
    return scale * (aux_recon - err.detach()).pow(2).sum() / total_var


class SparseAutoencoder(nn.Module):
    arch: str = ""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        W = torch.empty(n, d, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(W, a=math.sqrt(5))
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W.clone())
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    # ---- the shared interface ----
    def pre_acts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, n_latents]; into out[:N] when a buffer of at least N rows is given. A harvest on the CPU reuses
        one: glibc maps each allocation over 32 MB afresh, so a new product per batch (64 MB at 1,024 x 16,384)
        was page-faulted in every time, 25-60 ms of a 160 ms product on one EPYC core. Inference only: out= takes
        no gradient."""
        if out is None:
            return F.linear(x - self.b_dec, self.W_enc, self.b_enc)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t(), out=out[:x.shape[0]])

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [N, n_latents]."""
        return self.activate(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encode_sparse(self, x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N, m], indices [N, m]) holding every nonzero activation; zeros pad short rows. out: a
        buffer for the pre-activations (pre_acts)."""
        acts = self.activate(self.pre_acts(x, out))
        m = max(int((acts > 0).sum(-1).max().item()), 1)
        return acts.topk(m, dim=-1, sorted=False)

    def training_step(self, x: torch.Tensor, dead: torch.Tensor | None = None, total_var: torch.Tensor | None = None,
                      n_total: int | None = None) -> StepOutput:
        """Loss on x. A data-parallel rank passes its slice with the global batch's total_var and size n_total,
        so the ranks' losses (and gradients) sum to the single-process ones."""
        pre = self.pre_acts(x)
        acts = self.activate(pre)
        recon = self.decode(acts)
        total_var = _total_var(x, total_var)
        n_total = n_total or x.shape[0]
        err = x - recon
        fvu = err.pow(2).sum() / total_var
        rms = (total_var / n_total).sqrt()
        aux = self.dead_latent_loss(x, pre, err, dead, total_var, x.shape[0] / n_total)
        return StepOutput(fvu + x.shape[0] / n_total * self.sparsity_loss(pre, acts, rms) + aux / 32, recon, fvu,
                          (acts > 0).float().sum(-1).mean(), (acts > 0).any(0), aux)

    def param_groups(self) -> list[dict]:
        """Adam's parameter groups; each group's learning rate is the schedule's times its lr_scale."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def after_step(self, l0: float) -> None:
        """Called after each optimiser step with the global batch's mean L0 (the same on every rank)."""

    def dead_latent_loss(self, x, pre, err, dead, total_var, share: float = 1.0) -> torch.Tensor:
        """A loss that brings dead latents back (`dead` [n_latents] bool); none by default. `share` is x's
        part of the global batch, for terms that are not sums over tokens."""
        return torch.zeros((), device=x.device)

    def sparsity_loss(self, pre: torch.Tensor, acts: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens; rms is the batch's root-mean-square distance to its mean (a scale)."""
        return torch.zeros((), device=pre.device)

    # ---- weight maintenance ----
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        W = self.W_dec.data
        W /= torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        if self.W_dec.grad is None:
            return
        # vecdot and addcmul_ read each [n_latents, d] matrix once, with no product-sized temporaries
        W, g = self.W_dec.data, self.W_dec.grad
        g.addcmul_(torch.linalg.vecdot(g, W).unsqueeze(-1), W, value=-1)

    def calibrate(self, sample: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of (scaled) training inputs, after b_dec is set."""

    @torch.no_grad()
    def fold_input_scale(self, scale: float):
        """The SAE was trained on x * scale; afterwards it takes raw x. Decoder rows keep unit norm."""
        self.b_enc.data /= scale
        self.b_dec.data /= scale

    # ---- which latents fire ----
    def firing_rule(self) -> tuple[str, dict[str, torch.Tensor]]:
        """(the rule with its settings, the tensors it reads): all that decides which latents fire on an input.
        W_dec only shapes the output, and training-only settings (k of the threshold kinds) change nothing here."""
        raise NotImplementedError

    def _encoder(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}  # b_dec: encode reads x - b_dec

    def firing_sha(self) -> str:
        """sha256 of firing_rule. Loaders normalise names, layouts and dtypes, so the same SAE read from any format
        hashes alike, and its labels stay valid exactly while this stays the same."""
        rule, tensors = self.firing_rule()
        h = hashlib.sha256(f"{rule};".encode())
        for name, t in tensors.items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    # ---- other formats: sae.formats handles the files and the four tensors every kind has ----
    def to_saelens(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(this kind's keys of SAELens' cfg.json, this kind's tensors beyond the shared four)."""
        raise NotImplementedError

    @classmethod
    def reads_saelens(cls, architecture: str, activation: str) -> bool:
        """Whether SAELens' `architecture` with `activation_fn_str` loads as this kind."""
        return False

    @classmethod
    def from_saelens(cls, stored: Stored) -> SparseAutoencoder:
        raise NotImplementedError

    def to_sparsify(self) -> dict:
        """This kind's keys of sparsify's cfg.json."""
        raise InputError(f"the sparsify format holds TopK SAEs only, not {self.arch!r}; "
                         "convert this SAE --to native or --to saelens instead")

    @classmethod
    def reads_sparsify(cls, activation: str) -> bool:
        return False

    @classmethod
    def from_sparsify(cls, stored: Stored) -> SparseAutoencoder:
        raise NotImplementedError


class TopKSAE(SparseAutoencoder):
    """k largest pre-activations per token. Training runs on the sparse kernels (sae.kernels): one dense
    matmul picks the latents without autograd, and every gradient touches only the picked entries."""
    arch = "topk"

    def encode_sparse(self, x, out=None):
        vals, idx = topk_rows(self.pre_acts(x, out), self.cfg.k)
        return vals.relu(), idx

    def activate(self, pre):
        vals, idx = topk_rows(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum") + self.b_dec

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, Pattern]:
        """(pre-activation values [nnz], pattern) of the latents that fire."""
        vals, idx = topk_rows(pre, self.cfg.k)
        return vals.reshape(-1), topk_pattern(idx, pre.shape[1])

    def training_step(self, x, dead=None, total_var=None, n_total=None):
        xc = x - self.b_dec
        with torch.no_grad():
            pre = F.linear(xc, self.W_enc, self.b_enc)
            known, pattern = self._select(pre)
        acts = sparse_linear(xc, self.W_enc, self.b_enc, pattern, known).relu()
        recon = sparse_decode(acts, self.W_dec, pattern) + self.b_dec
        err = x - recon
        total_var = _total_var(x, total_var)
        fvu = err.pow(2).sum() / total_var
        aux = auxk_loss(self, xc, pre, err, dead, total_var)
        with torch.no_grad():
            on = acts > 0
            # index_add_, not a boolean index: that reads its count back to the host, a sync mid-step
            fired = torch.zeros(self.cfg.n_latents, device=x.device).index_add_(0, pattern.col, on.float()) > 0
            l0 = on.sum().float() / x.shape[0]
        return StepOutput(fvu + aux / 32, recon, fvu, l0, fired, aux)

    def firing_rule(self):
        return f"top {self.cfg.k}", self._encoder()

    def to_saelens(self):
        k = self.cfg.k
        return {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}, "k": k}, {}

    @classmethod
    def reads_saelens(cls, architecture, activation):
        # SAELens 5 wrote TopK as "standard" with a topk activation
        return architecture == "topk" or (architecture == "standard" and activation == "topk")

    @classmethod
    def from_saelens(cls, stored):
        k = stored.cfg.get("k") or (stored.cfg.get("activation_fn_kwargs") or {}).get("k")
        return stored.build(cls.arch, stored.integer("k", k))

    def to_sparsify(self):
        return {"activation": "topk", "k": self.cfg.k, "multi_topk": False}

    @classmethod
    def reads_sparsify(cls, activation):
        return activation == "topk"

    @classmethod
    def from_sparsify(cls, stored):
        return stored.build(cls.arch, stored.integer("k"))


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_batch_topk(flat: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the top (k x global batch) entries across all data-parallel ranks: selecting per
    rank would let a rank of quiet tokens take as many latents as a rank of busy ones."""
    dist = torch.distributed
    n = torch.tensor([n_local, flat.numel()], device=flat.device)
    dist.all_reduce(n)
    n_sel = int(n[0])
    # only a rank's own top n_sel can be among the global top n_sel; pad to one size for all_gather
    c = min(n_sel, flat.numel())
    cand = topk_flat(flat, c)[0]
    size = torch.tensor([c], device=flat.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padded = torch.full((int(size),), -1.0, dtype=flat.dtype, device=flat.device)
    padded[:c] = cand
    gathered = [torch.empty_like(padded) for _ in range(_world())]
    dist.all_gather(gathered, padded)
    tau = torch.cat(gathered).topk(min(n_sel, int(n[1])), sorted=False).values.min()
    # entries at 0 add nothing (acts are relu'd), so a threshold of 0 selects only the positive ones
    flat_idx = (flat >= tau).nonzero().squeeze(1) if tau > 0 else (flat > 0).nonzero().squeeze(1)
    return flat[flat_idx], flat_idx


class BatchTopKSAE(TopKSAE):
    """Top k·N activations across the whole batch; at inference a learned float32 threshold."""
    arch = "batchtopk"

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device, dtype)
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float32))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool, device=device))

    def _select(self, pre):
        if not self.training:
            on = pre > self.threshold.to(pre.dtype)
            flat = on.reshape(-1).nonzero().squeeze(1)
            pattern, _ = flat_pattern(flat, pre.shape[0], pre.shape[1])
            return pre[on], pattern
        flat = pre.relu().flatten()
        if _world() > 1:
            vals, flat_idx = _global_batch_topk(flat, pre.shape[0] * self.cfg.k)
        else:
            vals, flat_idx = topk_flat(flat, pre.shape[0] * self.cfg.k)
        # the smallest selected activation, tracked as an EMA in float32 for inference
        pos = vals > 0
        lo = vals[pos].min().float() if bool(pos.any()) else torch.tensor(math.inf, device=pre.device)
        if _world() > 1:  # every rank tracks the same, global, threshold
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        if math.isfinite(float(lo)):
            if bool(self.threshold_initialised):
                self.threshold.mul_(0.99).add_(0.01 * lo)
            else:
                self.threshold.copy_(lo)
                self.threshold_initialised.fill_(True)
        pattern, order = flat_pattern(flat_idx, pre.shape[0], pre.shape[1])
        return vals[order], pattern

    def activate(self, pre):
        return torch.where(pre > self.threshold.to(pre.dtype), pre, torch.zeros_like(pre))

    encode_sparse = SparseAutoencoder.encode_sparse   # not TopK's: a batch's rows fire in different numbers

    def fold_input_scale(self, scale):
        super().fold_input_scale(scale)
        self.threshold.data /= scale

    def _dense_threshold(self) -> torch.Tensor:
        return self.threshold.detach().float().expand(self.cfg.n_latents).clone()

    def firing_rule(self):
        # at inference k plays no part. Hashed as the JumpReLU that SAELens holds it as, whose threshold can be one
        # float32 step off ours (not every float32 is exp of one), so the SAE keeps its labels across the round trip
        as_jumprelu = threshold_of(log_threshold_of(self._dense_threshold()))
        return _ABOVE_THRESHOLD, {**self._encoder(), "threshold": as_jumprelu}

    def to_saelens(self):
        # at inference BatchTopK is a JumpReLU whose latents share one threshold
        return dict(_SAELENS_JUMPRELU), {"threshold": self._dense_threshold()}

    @classmethod
    def reads_saelens(cls, architecture, activation):
        return False

    def to_sparsify(self):
        return SparseAutoencoder.to_sparsify(self)

    @classmethod
    def reads_sparsify(cls, activation):
        return False


_ABOVE_THRESHOLD = "above threshold"
_SAELENS_JUMPRELU = {"architecture": "jumprelu", "activation_fn_str": "relu", "activation_fn_kwargs": {}}


class _JumpReLUFn(torch.autograd.Function):
    """JumpReLU with a straight-through rectangle-kernel estimate of d/dθ (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        near = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        # d/dθ = -(θ/ε)·K((z-θ)/ε), chained through θ = exp(log θ)
        grad_theta = -(threshold / bw) * (grad * near).sum(0) * threshold
        return grad_pre, grad_theta.float(), None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        grad_theta = -(1.0 / bw) * (grad * near).sum(0) * threshold
        return None, grad_theta.float(), None


class JumpReLUSAE(SparseAutoencoder):
    arch = "jumprelu"

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device, dtype)
        # float32 always: bf16 would round the small threshold updates away
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.jumprelu_init_threshold), device=device, dtype=torch.float32))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def param_groups(self):
        # Adam moves every parameter by about lr per step: a weight's step shifts a pre-activation by up to
        # lr x sum |x|, while log θ moves by lr, a relative 0.4% at lr 4e-3. At one learning rate the
        # thresholds could not follow the encoder: L0 fell from k = 16 to 6 within 15 steps and stayed low
        weights = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": weights, "lr_scale": 1.0},
                {"params": [self.log_threshold], "lr_scale": self.cfg.jumprelu_threshold_lr}]

    def activate(self, pre):
        return _JumpReLUFn.apply(pre.float(), self.log_threshold, self.cfg.jumprelu_bandwidth).to(pre.dtype)

    @torch.no_grad()
    def calibrate(self, sample):
        # each latent starts firing on a k / n_latents fraction of the sample, so L0 starts at the target k:
        # from a fixed small threshold L0 starts near n_latents / 2, and Adam's bounded steps on log θ take
        # far longer than a typical run to bring it down (a 200-step run ended at L0 708 for k = 16)
        x = sample.to(self.W_enc.dtype) - self.b_dec
        rank = max(1, min(len(x), round((1 - min(self.cfg.k / self.cfg.n_latents, 1.0)) * len(x))))
        for lo in range(0, self.cfg.n_latents, 16384):  # latents in blocks: [sample, n_latents] can be large
            sl = slice(lo, lo + 16384)
            theta = F.linear(x, self.W_enc[sl], self.b_enc[sl]).float().kthvalue(rank, dim=0).values
            self.log_threshold[sl] = theta.clamp_min(self.cfg.jumprelu_init_threshold).log()

    @torch.no_grad()
    def after_step(self, l0):
        # the L0 penalty acts through each threshold's kernel only and lost to the reconstruction in the
        # second half of a run (L0 drifted from 16 to 31): a controller on the global L0 holds it at k, and the
        # penalty still decides which latents fire. L0 settles where gain x (L0 - k) / k matches the thresholds'
        # Adam step (gain 0.05 against lr x 10 settled at 1.3 k); a gain much above 0.3 would oscillate
        self.log_threshold += self.cfg.jumprelu_l0_gain * (l0 - self.cfg.k) / self.cfg.k

    def dead_latent_loss(self, x, pre, err, dead, total_var, share=1.0):
        # a latent whose threshold sits above every pre-activation it sees gets no gradient from the
        # reconstruction nor from the step function's kernel: it never comes back by itself (a quarter of the
        # latents died on MiniLM layer 3). AuxK moves its encoder toward the residual, and its threshold is
        # pulled down until it fires again (Adam makes that a steady step of the threshold's learning rate)
        aux = auxk_loss(self, x - self.b_dec, pre, err, dead, total_var)
        if dead is None or not bool(dead.any()):
            return aux
        return aux + 32 * share * (self.log_threshold * dead).sum()

    def sparsity_loss(self, pre, acts, rms):
        # L0 via the step function, pulled toward the target k from both sides: a plain L0 penalty settles
        # wherever it balances the reconstruction, which on MiniLM was about k / 2 from the calibrated start.
        # The square is of the GLOBAL batch's L0: its gradient, 2 (L0 - k) / k^2 x dL0, is linear in this
        # rank's L0, so the ranks' shares sum to the single-process gradient (squares of the ranks' own L0
        # would not)
        steps = _StepFn.apply(pre.float(), self.log_threshold, self.cfg.jumprelu_bandwidth).sum(-1)
        l0 = steps.mean()
        total = torch.stack([steps.detach().sum(), torch.tensor(float(steps.numel()), device=steps.device)])
        if _world() > 1:
            torch.distributed.all_reduce(total)
        err = (total[0] / total[1] - self.cfg.k) / self.cfg.k
        return self.cfg.l0_coef * (err.square() + 2 * err / self.cfg.k * (l0 - l0.detach()))

    def fold_input_scale(self, scale):
        super().fold_input_scale(scale)
        self.log_threshold.data -= math.log(scale)

    def firing_rule(self):
        return _ABOVE_THRESHOLD, {**self._encoder(), "threshold": threshold_of(self.log_threshold)}

    def to_saelens(self):
        return dict(_SAELENS_JUMPRELU), {"threshold": threshold_of(self.log_threshold)}

    @classmethod
    def reads_saelens(cls, architecture, activation):
        return architecture == "jumprelu"

    @classmethod
    def from_saelens(cls, stored):
        if "threshold" in stored.extra:
            log_t = log_threshold_of(stored.extra["threshold"].float())
        elif "log_threshold" in stored.extra:
            log_t = stored.extra["log_threshold"].float()
        else:
            raise InputError(f"{stored.weights_path} is a jumprelu SAE without a threshold tensor")
        return stored.build(cls.arch, _stand_in_k(stored.common["n_latents"]), log_threshold=log_t)


class ReLUSAE(SparseAutoencoder):
    arch = "relu"

    def activate(self, pre):
        return pre.relu()

    def sparsity_loss(self, pre, acts, rms):
        # L1 weighted by decoder norm, relative to the input's spread so l1_coef is scale-free
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self.cfg.l1_coef * l1 / rms / self.cfg.k

    def firing_rule(self):
        return "above zero", self._encoder()

    def to_saelens(self):
        return {"architecture": "standard", "activation_fn_str": "relu", "activation_fn_kwargs": {}}, {}

    @classmethod
    def reads_saelens(cls, architecture, activation):
        return architecture == "standard" and activation == "relu"

    @classmethod
    def from_saelens(cls, stored):
        return stored.build(cls.arch, _stand_in_k(stored.common["n_latents"]))


ARCHS: dict[str, type[SparseAutoencoder]] = {c.arch: c for c in (TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE)}


def build(cfg: SAEConfig, device=None, dtype=torch.float32) -> SparseAutoencoder:
    return ARCHS[cfg.arch](cfg, device=device, dtype=dtype)


def load_state(cfg: SAEConfig, state: dict[str, torch.Tensor], where: Path) -> SparseAutoencoder:
    """The SAE of cfg holding `state` (cast to its dtypes), in eval mode; a mismatch names the file `where`."""
    sae = build(cfg)
    own = sae.state_dict()
    try:
        sae.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        first = first_line(e)
        raise InputError(f"{where}: weights do not match its cfg.json ({first})") from None
    return sae.eval()


def saelens_kind(architecture: str, activation: str) -> type[SparseAutoencoder] | None:
    """The kind that loads SAELens' `architecture` with `activation_fn_str`, if any."""
    return next((kind for kind in ARCHS.values() if kind.reads_saelens(architecture, activation)), None)


def sparsify_kind(activation: str) -> type[SparseAutoencoder] | None:
    return next((kind for kind in ARCHS.values() if kind.reads_sparsify(activation)), None)
