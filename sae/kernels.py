"""The sparse speed path of TopK/BatchTopK training: only the selected (token, latent) entries are touched.

A selection is a CSR pattern over [tokens, latents]. Three products cover the forward and backward of both
the encoder and the decoder:
  gather-dot   v[e] = a[row e] . W[col e]        (sampled dense-dense product, SDDMM)
  spmm         y[n] = sum_e v[e] W[col e]         (the pattern times a dense matrix)
  spmm^T       G[j] = sum_e v[e] a[row e]         (the pattern transposed, times a dense matrix)
so a step costs O(tokens * k * d) beyond the one dense encoder matmul that picks the latents, instead of
sparsify's materialised [tokens, k, d] contributions and dense zero-filled gradients.
All three run as MKL/cuSPARSE CSR kernels through torch.sparse; the transpose's sort is
done once per step and shared by the encoder and the decoder.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

from . import native

# torch.sparse CSR is marked beta; we build the patterns ourselves, sorted and in range, so say so once
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


@dataclass(eq=False)
class Pattern:
    """Selected entries of a [n_rows, n_cols] matrix in CSR form, rows ascending, row-major entry order."""
    crow: torch.Tensor      # [n_rows + 1] int64
    col: torch.Tensor       # [nnz] int64
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    @cached_property
    def row(self) -> torch.Tensor:
        counts = self.crow.diff()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.col.device), counts,
                                       output_size=self.col.numel())

    @cached_property
    def _transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, crow_t, row_sorted): entries sorted by column, for products with the pattern transposed."""
        perm = torch.argsort(self.col, stable=True)
        return perm, _crow(self.col, self.n_cols), self.row[perm]

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, size=(self.n_rows, self.n_cols),
                                       check_invariants=False)

    def spmm(self, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """y[n] = sum over entries e of row n: values[e] * W[col e]  -> [n_rows, d]. A CSR product, not
        embedding_bag: on an H200 cuSPARSE ran it 3.2x faster (0.93 against 2.97 ms at 4,096 tokens, k=64,
        d=4,096, bench notes in bench/README.md); on the CPU the two are even."""
        if self.col.numel() == 0:
            return W.new_zeros(self.n_rows, W.shape[1])
        return self.csr(values.to(W.dtype)) @ W

    def spmm_t(self, values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """G[j] = sum over entries e of column j: values[e] * a[row e]  -> [n_cols, d]."""
        perm, crow_t, row_sorted = self._transpose
        St = torch.sparse_csr_tensor(crow_t, row_sorted, values[perm].to(a.dtype), size=(self.n_cols, self.n_rows),
                                      check_invariants=False)
        return St @ a

    def gather_dot(self, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """v[e] = a[row e] . W[col e]  -> [nnz]."""
        if self.col.numel() == 0:
            return a.new_zeros(0)
        S = self.csr(torch.zeros(self.col.numel(), dtype=a.dtype, device=a.device))
        return torch.sparse.sampled_addmm(S, a, W.to(a.dtype).t(), beta=0.0).values()


def _crow(index: torch.Tensor, n: int) -> torch.Tensor:
    """[n + 1] CSR row pointers for entries whose row is `index`. index_add_, not bincount: CUDA's bincount
    reads the maximum back to the host, a sync that stalls the step's queue of kernels."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    crow[1:].index_add_(0, index, torch.ones_like(index))
    return crow.cumsum_(0)


# entries per group of topk_rows' passes where the C kernel does not answer, by device: measured best on each
# (at 1,024 x 16,384, k=32, one EPYC core: G=8 17-20 ms, G=4 17-20, G=16 24-27, torch's top-k 33; on an H200 at
# 4,096 x 131,072, k=64: G=32 0.99 ms, G=16 1.04, torch's 3.80)
TOPK_GROUP = {"cpu": 8, "cuda": 32}


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [N, k] of the k largest entries of each row of x [N, n], unsorted, as
    x.topk(k, dim=-1, sorted=False) gives them (an index may differ only among equal values).

    torch's one top-k over a long row is slow: on the CPU at n = 16,384 it cost a fifth of the encoder product
    it follows, and CUDA's radix select reads a long row several times. On the CPU a float32 matrix goes to the
    C kernel of sae/native.py, which reads each row once (at 1,024 x 16,384, k=32 on one EPYC core: 5.5 ms,
    against 18 for the two passes below). Elsewhere, or where it does not answer, two passes of torch ops:
    a row is cut into n/G strided groups of G = TOPK_GROUP[device] entries, group g holding columns
    g, g + n/G, g + 2n/G, ... (strided so that the maxima are one vectorised pass of elementwise maxima over G
    contiguous slices). Let t be the row's k-th largest value. Fewer than k entries exceed t, so fewer than k
    groups have a max > t, and all of them are among the k groups with the largest maxima; the rest of those k
    groups have max = t where enough such groups exist, else every group with an entry >= t is taken. Either
    way the k x G entries of the k chosen groups hold the row's k largest values, and a second top-k over them
    finishes. The k groups are themselves the top k of the n/G group maxima, found the same way while that row
    is long enough."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and 0 < k <= x.shape[1] and x.shape[0]):
        idx = native.topk_indices(x, k)
        if idx is not None:
            return x.gather(1, idx), idx
    G, n = TOPK_GROUP.get(x.device.type, 32), x.shape[-1]
    if x.dim() != 2 or n % G or 4 * k * G > n or not x.is_contiguous():
        return x.topk(k, dim=-1, sorted=False)
    N = x.shape[0]
    width = n // G
    groups = topk_rows(x.view(N, G, width).amax(1), k)[1]                              # [N, k]
    cols = (groups[:, :, None] + torch.arange(0, n, width, device=x.device)).view(N, k * G)
    vals, j = x.gather(1, cols).topk(k, dim=-1, sorted=False)
    return vals, cols.gather(1, j)


def topk_flat(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of a 1-D x, unsorted, as x.topk(k, sorted=False) gives them.

    On the CPU torch's top-k over one long array is slow: BatchTopK's k = 65,536 of 16.7 M entries (4,096
    tokens x 4,096 latents) took 207-280 ms at 2 threads, twice a whole TopK training step. Here the array is
    cut into a row per thread for topk_rows (the C kernel's threads work on rows); the k largest of the whole
    are among the k largest of each row, and one top-k over those finishes."""
    n, T = x.numel(), torch.get_num_threads()
    if x.device.type != "cpu" or x.dim() != 1 or n % T or not 0 < k <= n // T:
        return x.topk(k, sorted=False)
    width = n // T
    vals, idx = topk_rows(x.view(T, width), k)
    if T == 1:
        return vals.view(-1), idx.view(-1)
    cand = (idx + torch.arange(0, n, width)[:, None]).view(-1)
    vals, j = x.index_select(0, cand).topk(k, sorted=False)
    return vals, cand.index_select(0, j)


def topk_pattern(idx: torch.Tensor, n_cols: int) -> Pattern:
    """Each row's k selected columns (from torch.topk) as a pattern; entry order is idx.flatten()'s."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    return Pattern(crow, idx.reshape(-1).long(), n_cols)


def flat_pattern(flat_idx: torch.Tensor, n_rows: int, n_cols: int) -> tuple[Pattern, torch.Tensor]:
    """Entries given as row-major flat indices in any order -> (pattern, order) with pattern entry e being
    flat_idx[order[e]]."""
    order = torch.argsort(flat_idx)
    flat = flat_idx[order]
    rows, cols = flat // n_cols, flat % n_cols
    return Pattern(_crow(rows, n_rows), cols, n_cols), order


class _SparseLinear(torch.autograd.Function):
    """values[e] = a[row e] . W[col e] + b[col e] at a pattern's entries; `known` skips the forward product
    when the caller already has these values (the dense selection matmul computed them)."""

    @staticmethod
    def forward(ctx, a, W, b, pattern: Pattern, known):
        ctx.save_for_backward(a, W)
        ctx.pattern = pattern
        if known is not None:
            return known.to(a.dtype)
        return pattern.gather_dot(a, W) + b[pattern.col].to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, W = ctx.saved_tensors
        p: Pattern = ctx.pattern
        grad = grad.float()
        grad_a = p.spmm(grad, W.float()).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_W = p.spmm_t(grad, a.float()).to(W.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(p.n_cols, dtype=torch.float32, device=grad.device).index_add_(0, p.col, grad)
        return grad_a, grad_W, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """y[n] = sum_e values[e] W[col e] over row n's entries; backward touches only the selected rows of W."""

    @staticmethod
    def forward(ctx, values, W, pattern: Pattern):
        ctx.save_for_backward(values, W)
        ctx.pattern = pattern
        return pattern.spmm(values, W)

    @staticmethod
    def backward(ctx, grad):
        values, W = ctx.saved_tensors
        p: Pattern = ctx.pattern
        grad = grad.float()
        grad_v = p.gather_dot(grad, W.float()).to(values.dtype) if ctx.needs_input_grad[0] else None
        grad_W = p.spmm_t(values.float(), grad).to(W.dtype) if ctx.needs_input_grad[1] else None
        return grad_v, grad_W, None


def sparse_linear(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor, pattern: Pattern,
                  known: torch.Tensor | None = None) -> torch.Tensor:
    """[nnz] pre-activations at the pattern's entries, differentiable in a, W and b."""
    return _SparseLinear.apply(a, W, b, pattern, known)


def sparse_decode(values: torch.Tensor, W: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """[n_rows, d] = the pattern with these values times W, differentiable in values and W."""
    return _SparseDecode.apply(values, W, pattern)
