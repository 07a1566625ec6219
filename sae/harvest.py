"""Streaming harvest: for every SAE feature, the evidence an explainer and a scorer need.

One pass over the corpus. Per batch: the model runs only up to the hook, the SAE encodes sparsely, and
per-feature state is merged on the device. Memory is O(features x k): nothing of size tokens x features.

Per feature the state holds
- top: the k contexts with the largest activation (one per context, so windows of two examples never
  share a context), with the quantised activation window around each max;
- res: a bottom-C sample of its firing tokens by a keyed hash h(seed, feature, token). Keyed sampling is
  what makes shards mergeable exactly: the union's C smallest hashes are the same whichever process
  saw which token;
- counts, a fixed-point activation sum, and a 50-bin histogram over (0, H] with H the smallest power of
  two >= max. When the max grows H doubles and bins merge pairwise, which is exact (see _hist);
- a global pool of random contexts (the P smallest context hashes) with the features firing in each.

Quantile samples (10 equal-width bins over (0, max], 5 per bin) are chosen at the end, when max is known:
in each bin the 5 tokens with the smallest hash among the known ones (the res sample and the top
contexts' maxima). A uniform sample of a feature's tokens restricted to a bin is uniform within the bin,
so a bin with >= 5 sampled tokens gets exactly the 5 smallest-hash tokens of the whole bin; bins above
the k-th top value are known completely from the top set; only a sparse bin in between can fall short.

Split, disjoint by construction (per feature, by context): top ranks 0,2,4.., quantile samples and random
ranks 1,3,5.. -> explain; top ranks 1,3,5.. and random ranks 0,2,4.. -> score; quantile samples whose context
is a score context are dropped (random ranks start with score: see _random_examples). Both splits get random
non-firing contexts: the explainer's reference for what
a feature does not fire on, the scorers' negatives.

Disjoint by text too: corpora repeat passages, so at the end the contexts that examples would come from (the
referenced ones) are grouped by their tokens and only the smallest context id of each group is used; the
others are dropped from every example kind and counted (`duplicates_dropped`). The referenced set and the
tokens are the same whichever shard saw what, so the rule merges exactly. Statistics (counts, sums,
histograms) still count every token: they describe the corpus as it is.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .configs import HarvestConfig
from .errors import InputError

M32 = 0xFFFFFFFF
EMPTY_HASH = 1 << 62
SUM_SCALE = 1 << 16          # activation sums are kept in fixed point so shard merges add exactly
KINDS = ("top", "quantile", "random")
SPLITS = ("explain", "score")
log = logging.getLogger(__name__)
FEATURE_CHUNK = 16384        # feature rows handled at a time where all rows at once would make a large transient


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(p) for p in spec.split("/"))
    except ValueError:
        raise InputError(f"bad --shard {spec!r}; expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"bad --shard {spec!r}; expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # multipliers below 2^31 keep every product inside int64
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 16)


def keyhash(seed: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A deterministic 32-bit hash of (seed, a, b), a and b int64 >= 0."""
    x = _mix32(a + (seed * 0x9E37 + 0x1234567))
    x = _mix32(x ^ (b & M32))
    return _mix32(x ^ (b >> 32))


def _order_bits(prim: torch.Tensor) -> torch.Tensor:
    """int32 ordered as prim (float32 without NaN or -0, or int32) is."""
    if prim.dtype != torch.float32:
        return prim
    bits = prim.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)   # negative floats: flip the magnitude so order is integer order


def _sortable(prim: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) ordered as prim is."""
    return _order_bits(prim).long() + (1 << 31)


def _row_order(P: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Per row, the column order by (P, K) with the empty entries (K < 0) last whatever their P."""
    big = torch.iinfo(torch.long).max
    if int(K.max()) < 1 << 32:
        # one sort: P's 32 order bits above the key's 32 bits
        packed = (_order_bits(P).long() << 32) | K
        # empties in column order, so a sorted row's order is the identity and flush() leaves it alone
        last = big - K.shape[1] + torch.arange(K.shape[1], device=K.device)
        return torch.where(K < 0, last, packed).sort(dim=1).indices
    o = torch.where(K < 0, big, K).sort(dim=1, stable=True).indices
    return o.gather(1, P.gather(1, o).sort(dim=1, stable=True).indices)


def _largest(P: torch.Tensor, K: torch.Tensor, c: int) -> torch.Tensor:
    """Per row, the columns of its c largest entries by (P, K), the empty entries (prim `empty`, the largest
    value, and K = -1) largest of all."""
    if int(K.max()) < M32:
        # P's order bits above the key's 32 bits (an empty entry's -1 becomes 2^32 - 1, above every key)
        return ((_order_bits(P).long() << 32) | (K & M32)).topk(c, dim=1, sorted=False).indices
    return _row_order(P, K)[:, -c:]


def _run_start(start: torch.Tensor) -> torch.Tensor:
    """For a flat bool `start` (True where a run begins, start[0] True): the index where each entry's run
    begins. A cumsum and a gather rather than a cummax of the start positions: CUDA's cummax scan took 14 ms
    over 2 M entries on an H200."""
    first = start.nonzero().squeeze(1)
    return first[start.cumsum(0) - 1]


def _ranks(seg: torch.Tensor) -> torch.Tensor:
    """Each entry's position inside its run of equal values in the sorted seg."""
    start = torch.ones_like(seg, dtype=torch.bool)
    start[1:] = seg[1:] != seg[:-1]
    return torch.arange(seg.numel(), device=seg.device) - _run_start(start)


class _Bank:
    """Per feature the `cap` entries with the smallest (prim, key), with their activation windows.

    Between merges a row's entries sit in any order, each with its window in the same column, so a merge writes
    only what comes in: per row, of its entries and its best candidates (c of them) the c largest by (prim, key)
    lose (one top-c over a packed order key), and the winning candidates are written over the losing entries.
    A row is not shifted, sorted or copied whole, which at 1 M features (a couple of candidates per row and
    merge) was most of a merge's cost. flush() sorts every row by (prim, key) once, for the readers.
    Candidates that beat their row's worst entry as of the last merge (`worst`, contiguous so the test stays in
    cache: a superset of the real winners) wait in a buffer with their windows. A merge sorts the buffer by
    (feature, prim, key) and keeps each feature's best `cap`, and touches only the rows they belong to: its cost
    follows the candidates, not the number of features. The buffer is bounded in bytes, so memory is the rows
    plus a constant."""

    BUFFER_BYTES = 1 << 27

    def __init__(self, n: int, cap: int, width: int, prim_dtype: torch.dtype, empty, device,
                 scale_is_val: bool = False):
        self.n, self.cap, self.width, self.empty = n, cap, width, empty
        self.prim = torch.full((n, cap), empty, dtype=prim_dtype, device=device)
        self.key = torch.full((n, cap), -1, dtype=torch.long, device=device)
        self.val = torch.zeros((n, cap), device=device)
        # a top entry's window max is its context max, its val: one tensor under both names (200 MB at 1 M)
        self.scale = self.val if scale_is_val else torch.zeros((n, cap), device=device)
        self.win = torch.zeros((n, cap, width), dtype=torch.uint8, device=device)
        self.worst = torch.full((n,), empty, dtype=prim_dtype, device=device)
        self.buf: list[tuple] = []
        self.buf_size = 0
        entry = 8 + self.prim.element_size() + 8 + 4 + 4 + width
        self.flush_at = max(1 << 16, min(n * cap // 2, self.BUFFER_BYTES // entry))

    def to(self, device) -> "_Bank":
        shared = self.scale is self.val
        for name in ("prim", "key", "val", "scale", "win", "worst"):
            setattr(self, name, getattr(self, name).to(device))
        if shared:
            self.scale = self.val
        self.buf = [tuple(t.to(device) for t in part) for part in self.buf]
        return self

    def offer(self, f, prim, key, val, windows) -> None:
        """Candidates (feature, prim, key, val); windows(i) -> (uint8 [len(i), width], scale [len(i)])."""
        keep = (prim <= self.worst.index_select(0, f)).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        win, scale = windows(keep)
        self.buf.append((*(t.index_select(0, keep) for t in (f, prim, key, val)), scale, win))
        self.buf_size += keep.numel()
        if self.buf_size >= self.flush_at:
            self.merge_buffer()

    def flush(self, chunk: int = FEATURE_CHUNK) -> None:
        """Merges the buffer and sorts every row by (prim, key), empty entries last, windows with them."""
        self.merge_buffer(chunk)
        names = ("prim", "key", "val") + (() if self.scale is self.val else ("scale",))
        identity = torch.arange(self.cap, device=self.key.device)
        for lo in range(0, self.n, chunk):
            order = _row_order(self.prim[lo:lo + chunk], self.key[lo:lo + chunk])
            moved = (order != identity).any(1).nonzero().squeeze(1)
            if moved.numel():
                rows, o = moved + lo, order[moved]
                for name in names:
                    t = getattr(self, name)
                    t[rows] = t[rows].gather(1, o)
                self.win[rows] = self.win[rows].gather(1, o[:, :, None].expand(-1, -1, self.width))

    def merge_buffer(self, chunk: int = FEATURE_CHUNK) -> None:
        if not self.buf:
            return
        # joined column by column, each column's pieces dropped once joined
        cols = [list(c) for c in zip(*self.buf)]
        self.buf, self.buf_size = [], 0
        for j in range(len(cols)):
            cols[j] = torch.cat(cols[j])
        f, prim, key = cols[:3]
        # (feature, prim, key) order: by key, then stably by feature and prim packed into one int64
        order = torch.sort(key, stable=True).indices
        packed = (f.index_select(0, order) << 32) | _sortable(prim.index_select(0, order))
        order = order.index_select(0, torch.sort(packed, stable=True).indices)
        fs = f.index_select(0, order)
        rank = _ranks(fs)
        best = rank < self.cap                   # only a feature's best cap candidates can enter its row
        order, fs, rank = order[best], fs[best], rank[best]
        rows, counts = torch.unique_consecutive(fs, return_counts=True)
        ends = counts.cumsum(0).tolist()
        for r0 in range(0, rows.numel(), chunk):
            r1 = min(r0 + chunk, rows.numel())
            a, b = (ends[r0 - 1] if r0 else 0), ends[r1 - 1]
            row_in_chunk = torch.repeat_interleave(torch.arange(r1 - r0, device=fs.device), counts[r0:r1])
            self._merge_rows(rows[r0:r1], row_in_chunk, rank[a:b], order[a:b], cols)

    def _merge_rows(self, R, ri, rc, ci, cols) -> None:
        """Rows R with their candidates: candidate ci[j] (into the buffer columns) of row R[ri[j]], rank rc[j].
        Flat 1-D indexing throughout: torch's multi-index paths are several times slower on the CPU."""
        _, prim, key, val, scale, win = cols
        G, cap = R.numel(), self.cap
        c = int(rc.max()) + 1
        # per row its entries, then its candidates by rank; a row's unused candidate cells are empty
        P = torch.full((G, cap + c), self.empty, dtype=self.prim.dtype, device=R.device)
        K = torch.full((G, cap + c), -1, dtype=torch.long, device=R.device)
        P[:, :cap] = self.prim.index_select(0, R)
        K[:, :cap] = self.key.index_select(0, R)
        at = ri * (cap + c) + cap + rc
        P.view(-1)[at] = prim.index_select(0, ci)
        K.view(-1)[at] = key.index_select(0, ci)
        out = torch.zeros((G, cap + c), dtype=torch.bool, device=R.device).scatter_(1, _largest(P, K, c), True)
        # as many entries lose as candidate cells win, row by row: the k-th losing entry of a row (column order)
        # gives its place to the row's k-th winning cell. An entry that loses is real only if every empty entry
        # and cell lost too, so a winning cell that is empty only ever lands on an empty entry: it is skipped
        lose_r, lose_j = out[:, :cap].nonzero(as_tuple=True)
        cell = torch.full((G * c,), -1, dtype=torch.long, device=R.device)
        cell[ri * c + rc] = ci
        win_r, win_j = (~out[:, cap:]).nonzero(as_tuple=True)
        src = cell.index_select(0, win_r * c + win_j)
        real = (src >= 0).nonzero().squeeze(1)
        dst = R.index_select(0, lose_r.index_select(0, real)) * cap + lose_j.index_select(0, real)
        src = src.index_select(0, real)
        # index_copy_, not an indexed assignment: half the time, the windows' most of all
        moved = [(self.prim, prim), (self.key, key), (self.val, val)]
        if self.scale is not self.val:
            moved.append((self.scale, scale))
        for t, col in moved:
            t.view(-1).index_copy_(0, dst, col.index_select(0, src))
        self.win.view(-1, self.width).index_copy_(0, dst, win.index_select(0, src))
        self.worst.index_copy_(0, R, self.prim.index_select(0, R).amax(1))

    def merge(self, other: "_Bank", chunk: int = FEATURE_CHUNK) -> None:
        other.flush()
        # a chunk of the other's rows at a time: all of them at once would be a copy of the whole bank
        for lo in range(0, self.n, chunk):
            valid = other.key[lo:lo + chunk] >= 0
            part = [t[lo:lo + chunk][valid] for t in (other.prim, other.key, other.val, other.scale, other.win)]
            self.buf.append((valid.nonzero()[:, 0] + lo, *part))
            self.merge_buffer(chunk)

    def tensors(self) -> dict:
        """The bank's tensors, each once (the top bank's scale is its val)."""
        names = ("prim", "key", "val", "win") + (() if self.scale is self.val else ("scale",))
        return {k: getattr(self, k) for k in names}


class HarvestState:
    """The mergeable partial result of a harvest over some of the corpus's contexts."""

    def __init__(self, n_features: int, ctx_len: int, cfg: HarvestConfig | None = None, device="cpu"):
        cfg = cfg or HarvestConfig()
        self.cfg, self.n, self.L = cfg, n_features, ctx_len
        self.width = min(cfg.window, ctx_len)
        self.device = torch.device(device)
        dev = self.device
        self.n_tokens = 0
        self.n_fired = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.sumq = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.hist = torch.zeros((n_features, cfg.hist_bins), dtype=torch.long, device=dev)
        self.hist_hi = torch.zeros(n_features, device=dev)
        self.top = _Bank(n_features, cfg.top_k, self.width, torch.float32, math.inf, dev, scale_is_val=True)
        # the reservoir's hashes are 32-bit: kept as int32 (less 2^31), half the memory of int64
        self.res = _Bank(n_features, cfg.reservoir, self.width, torch.int32, torch.iinfo(torch.int32).max, dev)
        self.pool: dict[int, tuple[int, torch.Tensor]] = {}   # ctx -> (hash, firing features)
        self.contexts: dict[int, torch.Tensor] = {}           # ctx -> token ids, pruned to the referenced
        self._prune_at = 4096
        self.duplicates_dropped = 0                           # set by result_chunks
        self.resumed_tokens = 0                               # set where a harvest resumes this state

    # ---------------------------------------------------------------- streaming
    @torch.no_grad()
    def update(self, ctx_ids: torch.Tensor, tokens: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """ctx_ids [B] global context indices, tokens [B, L], the SAE's sparse code (vals, idx) [B*L, m], and
        mask [B, L]: False where a token is left out (a context's leading CLS/BOS, an outlier)."""
        # 1-D gathers here and in the banks by index_select: x[i] took 3-5x its time on the CPU (300 k entries)
        B, L = tokens.shape
        dev = self.device
        ctx_ids = ctx_ids.to(dev, torch.long)
        vals, idx = vals.to(dev).float(), idx.to(dev).long()
        if mask is not None:
            vals = vals * mask.to(dev).reshape(-1, 1)
        self.n_tokens += B * L if mask is None else int(mask.sum())
        for c, t in zip(ctx_ids.tolist(), tokens.to(torch.int32).cpu()):
            self.contexts[c] = t
        fired = (vals.reshape(-1) > 0).nonzero().squeeze(1)
        f, v = idx.reshape(-1).index_select(0, fired), vals.reshape(-1).index_select(0, fired)
        rows = fired // vals.shape[1]
        local, pos = rows // L, rows % L
        key = ctx_ids.index_select(0, local) * L + pos

        # per (feature, context) group: its max and the max's first position
        g = f * B + local
        ug, inv = torch.unique(g, return_inverse=True)
        gmax = torch.zeros(ug.numel(), device=dev).scatter_reduce_(0, inv, v, "amax", include_self=False)
        cand_pos = torch.where(v == gmax.index_select(0, inv), pos, torch.full_like(pos, L))
        gpos = torch.full((ug.numel(),), L, dtype=torch.long, device=dev).scatter_reduce_(0, inv, cand_pos, "amin")
        gf, gl = ug // B, ug % B

        self.n_fired.index_add_(0, f, torch.ones_like(f))
        self.sumq.index_add_(0, f, torch.round(v.double() * SUM_SCALE).long())
        self._hist(gf, gmax, f, v)

        def windows(group, at):
            return lambda i: self._windows(inv, pos, v, group.index_select(0, i), at.index_select(0, i))

        gid = torch.arange(ug.numel(), device=dev)
        self.top.offer(gf, -gmax, ctx_ids.index_select(0, gl) * L + gpos, gmax, windows(gid, gpos))
        self.res.offer(f, (keyhash(self.cfg.seed, f, key) - (1 << 31)).int(), key, v, windows(inv, pos))
        self._pool(ctx_ids, local, f)
        if len(self.contexts) > self._prune_at:
            self._prune()

    def _windows(self, inv, pos, v, group, at):
        """The activations of group[i] in a window of width w around at[i], quantised to bytes, and their max.
        Only the groups asked for are laid out densely: most candidates are gone by now once rows are full."""
        w, L = self.width, self.L
        # a dense row per group asked for, numbered in group order by a running count (a linear pass where
        # torch.unique sorted them)
        need = torch.zeros(int(inv.max()) + 1 if inv.numel() else 1, dtype=torch.bool, device=v.device)
        need[group] = True
        row_of = torch.where(need, need.cumsum(0) - 1, -1)
        compact = row_of.index_select(0, group)
        mine, spare = row_of.index_select(0, inv), int(need.sum()) * L
        # the other groups' firings all land in one spare cell past the end: one scatter, not three masked copies
        dense = torch.zeros(spare + 1, device=v.device).scatter_(0, torch.where(mine >= 0, mine * L + pos, spare), v)
        start = (at - w // 2).clamp(0, L - w)
        cells = (compact * L + start)[:, None] + torch.arange(w, device=v.device)
        a = dense.index_select(0, cells.view(-1)).view(-1, w)
        s = a.amax(-1)
        return torch.round(a / s.clamp_min(1e-30)[:, None] * 255).to(torch.uint8), s

    def _hist(self, gf, gmax, f, v) -> None:
        """gf, gmax: each (feature, context) group's feature (sorted) and max; f, v: the firings. Touches only
        the features that fired, so its cost follows the firings, not the number of features."""
        if f.numel() == 0:
            return
        nb = self.cfg.hist_bins
        uf, inv = torch.unique_consecutive(gf, return_inverse=True)
        bmax = torch.zeros(uf.numel(), device=f.device).scatter_reduce_(0, inv, gmax, "amax", include_self=False)
        mant, exp = torch.frexp(bmax)
        # the smallest power of two >= bmax, exactly
        hi = torch.ldexp(torch.ones_like(bmax), exp - (mant == 0.5).long())
        old = self.hist_hi.index_select(0, uf)
        grow = (hi > old) & (old > 0)
        if bool(grow.any()):
            g = uf[grow]
            ratio = (hi[grow] / old[grow]).long()
            new_bin = torch.arange(nb, device=f.device)[None] // ratio[:, None]
            self.hist[g] = torch.zeros_like(self.hist[g]).scatter_add_(1, new_bin, self.hist[g])
        self.hist_hi[uf] = torch.maximum(old, hi)
        # v * nb / hi: division by a power of two is exact, so a value lands in the same bin whether it was
        # counted before or after the range doubled (floor(floor(x) / 2) == floor(x / 2))
        b = torch.floor(v * nb / self.hist_hi.index_select(0, f)).long().clamp(0, nb - 1)
        self.hist.view(-1).index_add_(0, f * nb + b, torch.ones_like(b))

    def _pool(self, ctx_ids, local, f) -> None:
        P = self.cfg.pool
        h = keyhash(self.cfg.seed + 1, torch.zeros_like(ctx_ids), ctx_ids)
        worst = max(self.pool.values(), key=lambda e: e[0])[0] if len(self.pool) >= P else EMPTY_HASH
        for j in (h <= worst).nonzero().squeeze(1).tolist():
            c = int(ctx_ids[j])
            self.pool[c] = (int(h[j]), torch.unique(f[local == j]).cpu())
        self._trim_pool()

    def _trim_pool(self) -> None:
        if len(self.pool) > self.cfg.pool:
            keep = sorted(self.pool, key=lambda c: (self.pool[c][0], c))[: self.cfg.pool]
            self.pool = {c: self.pool[c] for c in keep}

    def referenced(self) -> set[int]:
        self.top.merge_buffer()
        self.res.merge_buffer()
        ref = set(self.pool)
        # a chunk of feature rows at a time: all rows' keys at once (and unique's copies of them) would be a
        # transient several times the size of the banks' keys, the largest of the whole streaming phase
        for lo in range(0, self.n, FEATURE_CHUNK):
            for b in (self.top, self.res):
                k = b.key[lo:lo + FEATURE_CHUNK]
                ref.update(torch.unique(k[k >= 0] // self.L).tolist())
        return ref

    def duplicate_contexts(self) -> set[int]:
        """Referenced contexts whose tokens repeat those of a smaller referenced context id: examples never
        come from them, so no text can be both in a feature's explain and its score split."""
        first: dict[bytes, int] = {}
        dups = set()
        for c in sorted(self.referenced()):
            k = self.contexts[c].numpy().tobytes()
            if first.setdefault(k, c) != c:
                dups.add(c)
        return dups

    def _prune(self) -> None:
        ref = self.referenced()
        self.contexts = {c: t for c, t in self.contexts.items() if c in ref}
        self._prune_at = max(4096, 2 * len(self.contexts))

    # ---------------------------------------------------------------- shards
    def merge(self, other: "HarvestState") -> None:
        if (other.n, other.L, other.cfg) != (self.n, self.L, self.cfg):
            raise InputError("cannot merge harvest shards made with different SAEs or settings")
        self.n_tokens += other.n_tokens
        self.n_fired += other.n_fired.to(self.device)
        self.sumq += other.sumq.to(self.device)
        hi = torch.maximum(self.hist_hi, other.hist_hi.to(self.device))
        self.hist = self._rebin(self.hist, self.hist_hi, hi) + self._rebin(other.hist.to(self.device),
                                                                           other.hist_hi.to(self.device), hi)
        self.hist_hi = hi
        self.top.merge(other.top)
        self.res.merge(other.res)
        self.pool.update(other.pool)
        self._trim_pool()
        self.contexts.update(other.contexts)
        self._prune()

    def _rebin(self, hist, lo, hi):
        ratio = torch.where(lo > 0, hi / lo.clamp_min(1e-38), torch.ones_like(hi)).long().clamp_min(1)
        new_bin = torch.arange(hist.shape[1], device=hist.device)[None] // ratio[:, None]
        return torch.zeros_like(hist).scatter_add_(1, new_bin, hist)

    def save(self, path, **extra) -> None:
        """The whole state to `path`, with any `extra` entries beside it (read back by `load_with`). Written to
        a temporary sibling and renamed: the file is whole or the one before it, however the process ends."""
        self.top.flush()
        self.res.flush()
        path = Path(path)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state": self.__dict__, **extra}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device="cpu") -> "HarvestState":
        return cls.load_with(path, device)[0]

    @classmethod
    def load_with(cls, path, device="cpu") -> tuple["HarvestState", dict]:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        st = cls.__new__(cls)
        st.__dict__.update(saved.pop("state"))
        return st.to(device), saved

    def to(self, device) -> "HarvestState":
        """The per-feature tensors on `device`; the contexts and the pool stay on the host, as update keeps them."""
        self.device = torch.device(device)
        for name in ("n_fired", "sumq", "hist", "hist_hi"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.top.to(self.device)
        self.res.to(self.device)
        return self

    # ---------------------------------------------------------------- the result
    def result(self, logits: "LogitTokens | None" = None) -> "HarvestResult":
        """The whole result in memory: fine for small SAEs and tests; write_harvest takes result_chunks."""
        return next(self.result_chunks(logits, chunk=max(self.n, 1)))

    def result_chunks(self, logits: "LogitTokens | None" = None,
                      chunk: int = FEATURE_CHUNK) -> Iterator["HarvestResult"]:
        """The result as consecutive feature ranges, each finalised only when asked for: finalising and
        writing a chunk at a time keeps the result's arrays from ever existing for all features at once, so
        peak memory is the state plus one chunk's examples. Concatenated they are exactly result()."""
        if self.n_tokens == 0:
            raise InputError("the harvest saw no tokens; give a larger --tokens or a non-empty corpus")
        self.top.flush()
        self.res.flush()
        dups = self.duplicate_contexts()
        self.duplicates_dropped = len(dups)
        dup = torch.tensor(sorted(dups), dtype=torch.long, device=self.device)
        return (self._finalise(lo, min(lo + chunk, self.n), logits, dup) for lo in range(0, self.n, chunk))

    @torch.no_grad()
    def _finalise(self, lo: int, hi: int, logits: "LogitTokens | None", dup: torch.Tensor) -> "HarvestResult":
        """Features [lo, hi); `dup`: the duplicate contexts no example may come from."""
        n_fired = self.n_fired[lo:hi].cpu()
        max_act = self.top.val[lo:hi, 0].cpu()
        mean = (self.sumq[lo:hi].double() / SUM_SCALE / self.n_fired[lo:hi].clamp_min(1)).float().cpu()
        top = self._top_rows(lo, hi, dup)
        parts = [self._top_examples(lo, top), self._quantile_examples(lo, hi, top, dup),
                 self._random_examples(lo, hi, dup)]
        ex = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        del parts
        order = np.lexsort((ex["rank"], ex["split"], ex["kind"], ex["feature"]))
        ex = {k: v[order] for k, v in ex.items()}
        contexts = {c: self.contexts[c].numpy() for c in np.unique(ex["ctx"]).tolist()}
        if logits is not None:
            logits = LogitTokens(*(getattr(logits, k)[lo:hi] for k in LogitTokens.__dataclass_fields__))
        return HarvestResult(
            n_tokens=self.n_tokens, ctx_len=self.L, width=self.width,
            density=(n_fired.double() / self.n_tokens).float().numpy(), n_fired=n_fired.numpy(),
            max_act=max_act.numpy(), mean_act=mean.numpy(), hist=self.hist[lo:hi].cpu().numpy(),
            hist_max=self.hist_hi[lo:hi].cpu().numpy(), contexts=contexts, logits=logits, offset=lo,
            examples=Examples(**{k: v for k, v in ex.items() if k != "rank"}))

    def _rows(self, f, key, kind, split, rank, qbin, win, scale):
        L, w = self.L, self.width
        pos = key % L
        start = (pos - w // 2).clamp(0, L - w)
        n = f.numel()
        return dict(feature=f.cpu().numpy().astype(np.int32), kind=np.full(n, kind, np.int8),
                    split=split.cpu().numpy().astype(np.int8), rank=rank.cpu().numpy().astype(np.int32),
                    ctx=(key // L).cpu().numpy().astype(np.int32), start=start.cpu().numpy().astype(np.int16),
                    max_pos=(pos - start).cpu().numpy().astype(np.int16), qbin=qbin.cpu().numpy().astype(np.int16),
                    scale=scale.cpu().numpy().astype(np.float32), acts=win.cpu().numpy())

    def _top_rows(self, lo, hi, dup) -> "_TopRows":
        """The top bank's rows [lo, hi) without entries from duplicate contexts, the rest moved left in order
        (so ranks, and with them the explain/score alternation, stay dense)."""
        t = self.top
        key, val, scale, win = t.key[lo:hi], t.val[lo:hi], t.scale[lo:hi], t.win[lo:hi]
        drop = (key >= 0) & torch.isin(key // self.L, dup)
        if not bool(drop.any()):
            return _TopRows(key, val, scale, win)
        order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
        kept = ~drop.gather(1, order)
        return _TopRows(torch.where(kept, key.gather(1, order), -1), torch.where(kept, val.gather(1, order), 0.0),
                        torch.where(kept, scale.gather(1, order), 0.0),
                        win.gather(1, order[:, :, None].expand_as(win)) * kept[:, :, None])

    def _top_examples(self, lo, top: "_TopRows"):
        f, r = (top.key >= 0).nonzero(as_tuple=True)
        return self._rows(f + lo, top.key[f, r], 0, r % 2, r, torch.full_like(r, -1), top.win[f, r], top.scale[f, r])

    def _quantile_examples(self, f_lo, f_hi, top: "_TopRows", dup):
        cfg, L = self.cfg, self.L
        out = []
        for lo in range(f_lo, f_hi, FEATURE_CHUNK):
            rows = slice(lo, min(lo + FEATURE_CHUNK, f_hi))
            local = slice(rows.start - f_lo, rows.stop - f_lo)
            features = torch.arange(rows.start, rows.stop, device=self.device)
            top_keys, res_keys = top.key[local], self.res.key[rows]
            # the known tokens of each feature: its reservoir sample, then its top contexts' maxima
            key = torch.cat([res_keys, top_keys], 1)
            val = torch.cat([self.res.val[rows], top.val[local]], 1)
            hashes = keyhash(cfg.seed, features[:, None].expand_as(key), key.clamp_min(0))
            valid = (key >= 0) & ~torch.isin(key // L, dup)
            score_ctx = torch.where(top_keys[:, 1::2] >= 0, top_keys[:, 1::2] // L, -2)
            valid &= ~((key // L)[:, :, None] == score_ctx[:, None, :]).any(-1)
            max_act = self.top.val[rows, :1].clamp_min(1e-30)     # the true max, duplicates or not
            qbin = torch.floor(val * cfg.n_bins / max_act).long().clamp(0, cfg.n_bins - 1)
            # sorting by (bin, hash) at once: bin in the high bits, the 32-bit hash below
            bin_hash = torch.where(valid, (qbin << 33) + hashes, torch.full_like(hashes, 1 << 62))
            bin_hash, order = bin_hash.sort(dim=1, stable=True)
            sorted_keys = key.gather(1, order)
            # `same`, not `dup`: the duplicate contexts are needed again by the next chunk of features
            same = torch.zeros_like(valid)
            same[:, 1:] = (bin_hash[:, 1:] == bin_hash[:, :-1]) & (sorted_keys[:, 1:] == sorted_keys[:, :-1])
            sorted_bins = bin_hash >> 33
            starts_bin = torch.ones_like(valid)
            starts_bin[:, 1:] = sorted_bins[:, 1:] != sorted_bins[:, :-1]
            position = torch.arange(bin_hash.shape[1], device=bin_hash.device).expand_as(bin_hash)
            width = bin_hash.shape[1]     # each row starts a run, so runs of the flattened rows stay in their row
            row_at = torch.arange(0, bin_hash.numel(), width, device=bin_hash.device)[:, None]
            bin_start = _run_start(starts_bin.flatten()).view_as(position) - row_at
            # rank among non-duplicates: duplicates are adjacent, so subtract the ones before in the bin
            dups_before = torch.cumsum(same.long(), 1)
            dups_before_bin = dups_before.gather(1, bin_start)
            rank = position - bin_start - (dups_before - dups_before_bin)
            chosen = (bin_hash < (1 << 62)) & ~same & (rank < cfg.per_bin)
            row, col = chosen.nonzero(as_tuple=True)
            slot = order[row, col]      # into [reservoir entries, top entries]
            res_cap = self.res.cap
            from_res = slot < res_cap
            res_slot, top_slot = slot.clamp(max=res_cap - 1), (slot - res_cap).clamp(min=0)
            win = torch.where(from_res[:, None], self.res.win[rows][row, res_slot], top.win[local][row, top_slot])
            scale = torch.where(from_res, self.res.scale[rows][row, res_slot], top.scale[local][row, top_slot])
            bins = sorted_bins[row, col]
            out.append(self._rows(features[row], sorted_keys[row, col], 1, torch.zeros_like(row),
                                  bins * cfg.per_bin + rank[row, col], bins, win, scale))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def _random_examples(self, f_lo, f_hi, dup):
        """Per split up to cfg.n_random non-firing pool contexts: the 2·n_random smallest by a per-feature
        hash, alternating score, explain, score, ... (a feature that fires almost everywhere has few: the
        scorers' negatives come first)."""
        cfg, L, w = self.cfg, self.L, self.width
        dups = set(dup.tolist())
        pool = sorted((c for c in self.pool if c not in dups), key=lambda c: (self.pool[c][0], c))
        n_pick = min(2 * cfg.n_random, len(pool))
        pctx = torch.tensor(pool, dtype=torch.long, device=self.device)
        out = []
        for lo in range(f_lo, f_hi, 65536):
            hi = min(lo + 65536, f_hi)
            fired = torch.zeros((hi - lo, len(pool)), dtype=torch.bool, device=self.device)
            for j, c in enumerate(pool):
                fs = self.pool[c][1].to(self.device)
                fs = fs[(fs >= lo) & (fs < hi)]
                fired[fs - lo, j] = True
            f0 = torch.arange(lo, hi, device=self.device)
            h = keyhash(cfg.seed + 2, f0[:, None].expand(-1, len(pool)), pctx[None].expand(hi - lo, -1))
            h = torch.where(fired, torch.full_like(h, EMPTY_HASH), h)
            hs, j = h.topk(n_pick, dim=1, largest=False, sorted=True) if n_pick else (h[:, :0], h[:, :0])
            fi, r = (hs < EMPTY_HASH).nonzero(as_tuple=True)
            ctx = pctx[j[fi, r]]
            pos = w // 2 + keyhash(cfg.seed + 3, f0[fi], ctx) % (L - w + 1)   # a random window, no max
            out.append(self._rows(f0[fi], ctx * L + pos, 2, 1 - r % 2, r, torch.full_like(r, -1),
                                  torch.zeros((fi.numel(), w), dtype=torch.uint8), torch.zeros(fi.numel())))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


@dataclass
class _TopRows:
    """Some feature rows of the top bank, as the result reads them."""
    key: torch.Tensor
    val: torch.Tensor
    scale: torch.Tensor
    win: torch.Tensor


@dataclass
class Examples:
    """All examples of a harvest as flat arrays, sorted by (feature, kind, split, rank).
    kind indexes KINDS, split indexes SPLITS; window i is contexts[ctx[i]][start[i]:start[i]+width]
    with activations acts[i] / 255 * scale[i]."""
    feature: np.ndarray
    kind: np.ndarray
    split: np.ndarray
    ctx: np.ndarray
    start: np.ndarray
    max_pos: np.ndarray
    qbin: np.ndarray
    scale: np.ndarray
    acts: np.ndarray

    def __len__(self) -> int:
        return len(self.feature)


@dataclass
class LogitTokens:
    top_ids: np.ndarray
    top_vals: np.ndarray
    bottom_ids: np.ndarray
    bottom_vals: np.ndarray


@dataclass
class HarvestResult:
    n_tokens: int
    ctx_len: int
    width: int
    density: np.ndarray
    n_fired: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    hist: np.ndarray
    hist_max: np.ndarray
    examples: Examples
    contexts: dict[int, np.ndarray]
    logits: LogitTokens | None = None
    offset: int = 0          # a chunk of result_chunks: its arrays are features offset, offset + 1, ...
    bounds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        # examples of feature offset + i are rows bounds[i]:bounds[i+1]
        self.bounds = np.searchsorted(self.examples.feature, np.arange(len(self.density) + 1) + self.offset)

    @property
    def n_features(self) -> int:
        return len(self.density)

    def feature_examples(self, i: int, sae: str = "", decode=None):
        from .records import Example, FeatureExamples

        ex, w = self.examples, self.width
        out = []
        for j in range(self.bounds[i - self.offset], self.bounds[i - self.offset + 1]):
            s = int(ex.start[j])
            ids = self.contexts[int(ex.ctx[j])][s:s + w].tolist()
            acts = (ex.acts[j].astype(np.float32) / 255 * ex.scale[j]).tolist()
            out.append(Example(token_ids=ids, acts=acts, kind=KINDS[ex.kind[j]], split=SPLITS[ex.split[j]],
                               quantile_bin=int(ex.qbin[j]) if ex.qbin[j] >= 0 else None,
                               tokens=decode(ids) if decode else None))
        return FeatureExamples(sae=sae, index=i, examples=out, max_act=float(self.max_act[i - self.offset]),
                               density=float(self.density[i - self.offset]))


@torch.no_grad()
def logit_tokens(W_dec: torch.Tensor, W_U: torch.Tensor, n: int = 10, chunk: int = 2048) -> LogitTokens:
    """Top and bottom n tokens of each decoder direction read through the unembedding W_U [vocab, d]."""
    parts = []
    for i in range(0, W_dec.shape[0], chunk):
        s = W_dec[i:i + chunk].float() @ W_U.float().T
        parts.append((s.topk(n, 1), s.topk(n, 1, largest=False)))

    def cat(xs):
        return torch.cat(xs).cpu().numpy()

    return LogitTokens(cat([p[0].indices for p in parts]).astype(np.int32), cat([p[0].values for p in parts]),
                       cat([p[1].indices for p in parts]).astype(np.int32), cat([p[1].values for p in parts]))


def shard_batches(contexts: Iterator[list[int]], n_contexts: int, batch_size: int,
                  shard: tuple[int, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(global context ids, tokens) batches of this shard: whole batches go round-robin to shards, so a
    shard computes exactly the batches, and so the bits, the unsharded run computes."""
    i, n = shard
    buf: list[list[int]] = []
    c = -1
    for c, ctx in enumerate(itertools.islice(contexts, n_contexts)):
        if (c // batch_size) % n == i:
            buf.append(ctx)
        if c % batch_size == batch_size - 1 and buf:
            yield torch.arange(c + 1 - len(buf), c + 1), torch.tensor(buf, dtype=torch.long)
            buf = []
    if buf:
        yield torch.arange(c + 1 - len(buf), c + 1), torch.tensor(buf, dtype=torch.long)


class GroupedUpdates:
    """Hands forward batches to HarvestState.update a group at a time. One update launches some hundreds of
    kernels and waits on the device about a hundred times whatever its size: on an H200, a 4,096-token update
    took 12.9 ms of which the GPU worked 1.6, so a GPU harvest groups 16 k tokens per update (64 k measured
    no better on the GPU benchmark, bench/README.md). The state is the same however the batches are grouped
    (tested), so grouping is only a matter of speed."""

    def __init__(self, state: "HarvestState", min_tokens: int):
        self.state, self.min_tokens = state, min_tokens
        self.parts: list[tuple] = []
        self.n = 0

    def add(self, ids, tokens, vals, idx, mask=None) -> None:
        self.parts.append((ids, tokens, vals, idx, mask))
        self.n += tokens.numel()
        if self.n >= self.min_tokens:
            self.flush()

    def flush(self) -> None:
        if len(self.parts) == 1:    # no copies
            self.state.update(*self.parts[0])
        elif self.parts:
            ids, tokens, vals, idx, masks = zip(*self.parts)
            mask = None if masks[0] is None else torch.cat(masks)
            # a JumpReLU's codes are as wide as a batch's most active token: zeros pad them to the widest
            m = max(v.shape[1] for v in vals)
            vals, idx = ([F.pad(t, (0, m - t.shape[1])) for t in ts] for ts in (vals, idx))
            self.state.update(torch.cat(ids), torch.cat(tokens), torch.cat(vals), torch.cat(idx), mask)
        self.parts, self.n = [], 0


def group_tokens(device: torch.device) -> int:
    """Tokens per HarvestState.update: many on a GPU (see GroupedUpdates); 4,096 on the CPU, where an update's
    fixed cost is smaller but its small ops run below torch's parallel grain: at 2 threads, 16 updates of
    1,024 tokens into a warm 16,384-feature state took 0.21-0.27 s of wall time, and 4 of 4,096 0.17-0.18
    (0.24 and 0.21 s of CPU at 1 thread; ad-hoc timings on the EPYC box of bench/README.md, session 9)."""
    return 16_384 if device.type == "cuda" else 4_096


@dataclass(frozen=True)
class Checkpoint:
    """Where a harvest saves its progress, and how often (seconds). `key` names the SAE's weights (its
    firing_sha); the harvest adds its own arguments to it. A file that does not match them, left by another
    harvest, is not resumed but replaced."""
    path: Path
    key: str
    every_s: float = 300.0


def _resume(ck: Checkpoint | None, key: str, device) -> tuple[HarvestState | None, int]:
    """The saved state and the number of batches it holds, or (None, 0) where there is nothing to resume."""
    if ck is None or not ck.path.exists():
        return None, 0
    state, saved = HarvestState.load_with(ck.path, device)
    if saved.get("key") != key:
        log.warning("harvest: %s was left by a harvest of other weights or arguments; starting afresh", ck.path)
        return None, 0
    log.warning("harvest: resuming from %s (%d tokens done)", ck.path, state.n_tokens)
    state.resumed_tokens = state.n_tokens
    return state, saved["batches"]


def _save_progress(ck: Checkpoint, key: str, state: HarvestState, batches: int) -> None:
    ck.path.parent.mkdir(parents=True, exist_ok=True)
    state.save(ck.path, key=key, batches=batches)


@torch.no_grad()
def harvest(hooked, sae, corpus: str, tokens: int, cfg: HarvestConfig | None = None, batch_size: int = 16,
            shard: tuple[int, int] = (0, 1), progress: bool = True,
            checkpoint: Checkpoint | None = None) -> HarvestState:
    """Streams `tokens` tokens of `corpus` (this shard's part), in contexts of cfg.ctx_len tokens, through model
    and SAE into a HarvestState.

    With a checkpoint the state and the count of batches behind it are saved every `every_s` seconds, at the
    end of a group of updates, and no more often than keeps saving under 5% of the time (at 1 M features a
    checkpoint is 5.7 GiB and took 18 s); a harvest that finds a matching checkpoint skips those batches (they are still
    tokenised, not run) and goes on. The state is the same however the batches were grouped, so a resumed
    harvest ends with the bits of one that was never stopped (tested)."""
    from tqdm import tqdm

    from .corpus import iter_contexts
    from .models import content_mask

    cfg = cfg or HarvestConfig()
    ctx_len = cfg.ctx_len
    if sae.cfg.d_in != hooked.d_in:
        raise InputError(f"the SAE reads d_in={sae.cfg.d_in} but {type(hooked.model).__name__} layer "
                         f"{hooked.layer} site {hooked.site} gives {hooked.d_in}; use the SAE's own model/layer/site")
    if tokens < ctx_len:
        raise InputError(f"--tokens must be at least one context ({ctx_len} tokens), got {tokens}")
    dev = hooked.device
    n_ctx = tokens // ctx_len
    key = hashlib.sha256(repr((checkpoint and checkpoint.key, corpus, tokens, batch_size, shard, dev.type,
                               sae.cfg.n_latents, dataclasses.asdict(cfg))).encode()).hexdigest()
    state, done = _resume(checkpoint, key, dev)
    state = state or HarvestState(sae.cfg.n_latents, ctx_len, cfg, dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    mine = n_ctx * ctx_len // shard[1]
    updates = GroupedUpdates(state, group_tokens(dev))
    # the pre-activations' buffer, reused batch after batch on the CPU (SparseAutoencoder.pre_acts); CUDA's
    # caching allocator already reuses the memory, and autocast takes no out=
    scratch = torch.empty(batch_size * ctx_len, sae.cfg.n_latents, dtype=sae.W_enc.dtype) if dev.type == "cpu" else None
    t0 = saved_at = time.perf_counter()
    save_s = 0.0     # the last save's seconds: saves come at most every 20 of them (5% of the time)
    n0 = state.n_tokens
    batches = shard_batches(iter_contexts(corpus, hooked.tokenizer, ctx_len), n_ctx, batch_size, shard)
    with tqdm(total=mine, unit="tok", unit_scale=True, disable=not progress, desc="harvest", leave=False) as bar:
        for b, (ids, tok) in enumerate(batches):
            bar.update(tok.numel())
            if b < done:
                continue
            with autocast:
                x = hooked.activations(tok).flatten(0, 1)
                vals, idx = sae.encode_sparse(x.to(sae.W_enc.dtype), scratch)
            updates.add(ids, tok, vals, idx, content_mask(tok, hooked.tokenizer))
            if not updates.parts:  # the state has just taken a group
                bar.set_postfix(alive=f"{float((state.n_fired > 0).float().mean()):.1%}",
                                tok_s=f"{(state.n_tokens - n0) / (time.perf_counter() - t0):.0f}", refresh=False)
                if checkpoint and time.perf_counter() - saved_at >= max(checkpoint.every_s, 20 * save_s):
                    t = time.perf_counter()
                    _save_progress(checkpoint, key, state, b + 1)
                    saved_at = time.perf_counter()
                    save_s = saved_at - t
        updates.flush()
    if state.n_tokens == 0:
        raise InputError(f"shard {shard[0]}/{shard[1]} got no contexts of corpus {corpus!r}: "
                         f"give more --tokens (at least {shard[1] * batch_size * ctx_len}) or fewer shards")
    return state
