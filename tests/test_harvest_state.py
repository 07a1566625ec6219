"""The streaming harvest state against brute force on synthetic sparse codes: top-k, quantile bins,
histograms, the explain/score split, and shard merges."""
import math

import numpy as np
import pytest
import torch

from sae.errors import InputError
from sae.harvest import GroupedUpdates, HarvestConfig, HarvestState, keyhash, logit_tokens, parse_shard, shard_batches

F, L, B, M = 40, 16, 6, 5
CFG = HarvestConfig(top_k=6, window=8, n_bins=4, per_bin=2, n_random=3, reservoir=12, pool=12, hist_bins=10)


def synthetic_batch(bi: int):
    g = torch.Generator().manual_seed(bi)
    vals = torch.rand(B * L, M, generator=g) * (torch.rand(B * L, M, generator=g) > 0.4)
    idx = torch.stack([torch.randperm(F, generator=g)[:M] for _ in range(B * L)])
    tokens = torch.randint(0, 1000, (B, L), generator=g)
    return torch.arange(bi * B, bi * B + B), tokens, vals, idx


def dense_acts(n_batches: int) -> np.ndarray:
    """[contexts, L, F] activations, the brute-force reference."""
    out = np.zeros((n_batches * B, L, F), np.float32)
    for bi in range(n_batches):
        ids, _, vals, idx = synthetic_batch(bi)
        d = torch.zeros(B * L, F).scatter_(1, idx, vals).reshape(B, L, F)
        out[ids.numpy()] = d.numpy()
    return out


def run(batches, cfg=CFG) -> HarvestState:
    st = HarvestState(F, L, cfg)
    for bi in batches:
        st.update(*synthetic_batch(bi))
    return st


@pytest.fixture(scope="module")
def full():
    return run(range(24)).result()


def test_stats_and_top_contexts_match_brute_force(full):
    acts = dense_acts(24)
    flat = acts.reshape(-1, F)
    np.testing.assert_array_equal(full.n_fired, (flat > 0).sum(0))
    np.testing.assert_allclose(full.density, (flat > 0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(full.max_act, flat.max(0), rtol=0)
    mean = np.array([flat[flat[:, f] > 0, f].mean() for f in range(F)])
    np.testing.assert_allclose(full.mean_act, mean, rtol=1e-4)
    ctx_max = acts.max(1)                                    # [contexts, F]
    ex = full.examples
    for f in range(F):
        top = (ex.feature == f) & (ex.kind == 0)
        want = np.sort(ctx_max[:, f])[::-1][:CFG.top_k]
        got = np.sort(ex.scale[top])[::-1]                   # scale is the window max == the context max
        np.testing.assert_allclose(got, want[want > 0], rtol=1e-6)
        assert len(set(ex.ctx[top])) == top.sum()            # one example per context


def test_histogram_counts_every_firing_token(full):
    flat = dense_acts(24).reshape(-1, F)
    for f in range(F):
        v = flat[flat[:, f] > 0, f]
        hi = full.hist_max[f]
        assert hi >= v.max() and hi / 2 < v.max()          # the smallest power of two above the max
        want = np.clip(np.floor(v * CFG.hist_bins / hi), 0, CFG.hist_bins - 1).astype(int)
        np.testing.assert_array_equal(full.hist[f], np.bincount(want, minlength=CFG.hist_bins))


def test_quantile_samples_lie_in_their_bins_and_are_the_smallest_keys(full):
    acts = dense_acts(24)
    flat = acts.reshape(-1, F)
    ex = full.examples
    exact_bins = []
    for f in range(F):
        q = (ex.feature == f) & (ex.kind == 1)
        mx = full.max_act[f]
        keys = ex.ctx[q].astype(np.int64) * L + ex.start[q] + ex.max_pos[q]
        vals = flat[keys, f]
        assert (vals > 0).all()
        lo, hi = ex.qbin[q] * mx / CFG.n_bins, (ex.qbin[q] + 1) * mx / CFG.n_bins
        assert ((vals > lo - 1e-6) & (vals <= hi + 1e-6)).all()
        assert np.bincount(ex.qbin[q], minlength=CFG.n_bins).max() <= CFG.per_bin
        # the state keeps a bottom-C sample of each feature's tokens by hash; a bin holding at least per_bin
        # of them gets exactly the per_bin smallest hashes of ALL its tokens (score contexts excluded)
        score_ctx = list(set(ex.ctx[(ex.feature == f) & (ex.kind == 0) & (ex.split == 1)].tolist()))
        all_keys = np.flatnonzero(flat[:, f] > 0)
        all_bins = np.clip(np.floor(flat[all_keys, f] * CFG.n_bins / mx), 0, CFG.n_bins - 1)
        h = keyhash(CFG.seed, torch.full((len(all_keys),), f), torch.from_numpy(all_keys)).numpy()
        sampled = np.zeros(len(all_keys), bool)
        sampled[np.lexsort((all_keys, h))[:CFG.reservoir]] = True
        for b in range(CFG.n_bins):
            in_bin = (all_bins == b) & ~np.isin(all_keys // L, score_ctx)
            if (in_bin & sampled).sum() >= CFG.per_bin:
                want = set(all_keys[in_bin][np.lexsort((all_keys[in_bin], h[in_bin]))][:CFG.per_bin].tolist())
                assert set(keys[ex.qbin[q] == b].tolist()) == want
                exact_bins.append(b)
    assert len(exact_bins) > F  # the exact case is the common one here


def test_explain_and_score_sets_are_disjoint_by_context(full):
    ex = full.examples
    with_both = 0
    for f in range(F):
        fe = full.feature_examples(f)
        explain = {(c) for c, e in zip(ex.ctx[full.bounds[f]:full.bounds[f + 1]], fe.examples) if e.split == "explain"}
        score = {(c) for c, e in zip(ex.ctx[full.bounds[f]:full.bounds[f + 1]], fe.examples) if e.split == "score"}
        assert explain and score and not (explain & score)
        kinds = {(e.kind, e.split) for e in fe.examples}
        # each split has its own top and random examples (the score split first where non-firing contexts
        # are scarce); quantile samples go to the explainer only
        assert {("top", "explain"), ("top", "score"), ("quantile", "explain"), ("random", "score")} <= kinds
        assert kinds <= {("top", "explain"), ("top", "score"), ("quantile", "explain"), ("random", "explain"),
                         ("random", "score")}, f
        n_random = [sum(e.kind == "random" and e.split == sp for e in fe.examples) for sp in ("score", "explain")]
        assert CFG.n_random >= n_random[0] >= n_random[1] >= n_random[0] - 1, (f, n_random)
        with_both += n_random[1] > 0
    assert with_both >= F // 2


def duplicated_batch(bi: int):
    """Batches 12.. repeat the tokens (and so the activations) of batches 0.. under new context ids: a corpus
    that repeats passages, as licence headers and boilerplate do."""
    ids, tokens, vals, idx = synthetic_batch(bi % 12)
    return ids + B * (bi - bi % 12), tokens, vals, idx


def run_duplicated(batches) -> HarvestState:
    st = HarvestState(F, L, CFG)
    for bi in batches:
        st.update(*duplicated_batch(bi))
    return st


def test_duplicate_contexts_are_dropped_so_the_splits_are_disjoint_by_text():
    st = run_duplicated(range(24))
    res = st.result()
    assert st.duplicates_dropped > 0
    # of a context and its copy, examples only ever come from the first
    kept = {int(c) for c in res.examples.ctx}
    assert not any(c + 12 * B in kept for c in kept)
    for f in range(F):
        fe = res.feature_examples(f)
        rows = res.examples.ctx[res.bounds[f]:res.bounds[f + 1]]
        content = [res.contexts[int(c)].tobytes() for c in rows]
        by_split = {sp: {t for t, e in zip(content, fe.examples) if e.split == sp} for sp in ("explain", "score")}
        assert not (by_split["explain"] & by_split["score"]), f
        # one example per distinct text among the top contexts: a repeated passage is shown once
        tops = [t for t, e in zip(content, fe.examples) if e.kind == "top"]
        assert len(tops) == len(set(tops)), f
    # the same without the duplicates: the dropped copies hid no text the distinct corpus has
    distinct = run_duplicated(range(12)).result()
    np.testing.assert_array_equal(res.max_act, distinct.max_act)


def test_duplicates_drop_the_same_contexts_in_shards():
    full = run_duplicated(range(24))
    want = full.result()
    parts = [run_duplicated(range(i, 24, 3)) for i in range(3)]
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    got = merged.result()
    assert merged.duplicates_dropped == full.duplicates_dropped > 0
    for k in want.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(want.examples, k), err_msg=k)


def test_the_result_does_not_depend_on_how_many_feature_rows_are_finalised_at_once(monkeypatch):
    """The quantile pass walks the features in chunks; each chunk must see the same duplicate contexts
    (a chunk once overwrote them with its own mask, which CUDA refused and the CPU silently misread)."""
    st = run_duplicated(range(24))
    want = st.result()
    monkeypatch.setattr("sae.harvest.FEATURE_CHUNK", 7)
    got = st.result()
    assert st.duplicates_dropped > 0
    for k in want.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(want.examples, k), err_msg=k)


def test_grouping_batches_into_one_update_changes_nothing(full):
    st = HarvestState(F, L, CFG)
    updates = GroupedUpdates(st, min_tokens=5 * B * L)   # groups of 5, then a last group of 4
    for bi in range(24):
        ids, tokens, vals, idx = synthetic_batch(bi)
        # codes of different widths, as a JumpReLU's are (zeros pad a batch's rows to its widest)
        pad = bi % 3
        updates.add(ids, tokens, torch.nn.functional.pad(vals, (0, pad)), torch.nn.functional.pad(idx, (0, pad)))
    assert len(updates.parts) == 4
    updates.flush()
    assert not updates.parts
    got = st.result()
    assert st.n_tokens == 24 * B * L
    for k in full.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(full.examples, k), err_msg=k)
    np.testing.assert_array_equal(got.max_act, full.max_act)
    for k in ("density", "mean_act", "hist"):
        np.testing.assert_array_equal(getattr(got, k), getattr(full, k), err_msg=k)


def test_random_examples_never_fire(full):
    acts = dense_acts(24)
    ex = full.examples
    r = ex.kind == 2
    assert r.sum() > 0
    for f, c in zip(ex.feature[r], ex.ctx[r]):
        assert acts[c, :, f].max() == 0
    assert (ex.scale[r] == 0).all()


def test_windows_hold_the_tokens_and_quantised_activations(full):
    acts = dense_acts(24)
    toks = {}
    for bi in range(24):
        ids, t, _, _ = synthetic_batch(bi)
        for i, row in zip(ids.tolist(), t):
            toks[i] = row.numpy()
    for f in (0, 7, 33):
        fe = full.feature_examples(f)
        lo = full.bounds[f]
        for j, e in enumerate(fe.examples):
            c, s = int(full.examples.ctx[lo + j]), int(full.examples.start[lo + j])
            assert e.token_ids == toks[c][s:s + full.width].tolist()
            np.testing.assert_allclose(e.acts, acts[c, s:s + full.width, f], atol=full.examples.scale[lo + j] / 255)


def test_merged_shards_equal_the_unsharded_run(full):
    parts = [run(range(i, 24, 3)) for i in range(3)]
    merged = parts[2]
    merged.merge(parts[0])
    merged.merge(parts[1])
    got = merged.result()
    for k in ("density", "n_fired", "max_act", "mean_act", "hist", "hist_max"):
        np.testing.assert_array_equal(getattr(got, k), getattr(full, k), err_msg=k)
    for k in full.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(full.examples, k), err_msg=k)
    assert got.contexts.keys() == full.contexts.keys()


def test_kept_contexts_are_the_referenced_ones_and_do_not_grow_with_tokens():
    big = run(range(200))
    seen = 200 * B
    big._prune()
    # token windows are kept only for contexts some feature still references, and those are bounded by the
    # state's slots (top, reservoir, pool), not by the tokens read
    assert set(big.contexts) == big.referenced()
    assert len(big.contexts) <= F * (CFG.top_k + CFG.reservoir) + CFG.pool < seen
    # a state that prunes often holds no more than its threshold after any batch
    st = HarvestState(F, L, CFG)
    st._prune_at = 40
    for bi in range(30):
        st.update(*synthetic_batch(bi))
        assert len(st.contexts) <= max(40, 2 * len(st.referenced()))


def test_shard_batches_partition_the_contexts():
    ctxs = [[i] * 4 for i in range(23)]
    seen = []
    for i in range(3):
        for ids, tok in shard_batches(iter(ctxs), 20, 4, (i, 3)):
            assert ids.tolist() == tok[:, 0].tolist()
            assert len(ids) == 4 or ids[-1] == 19
            seen += ids.tolist()
    assert sorted(seen) == list(range(20))


@pytest.mark.parametrize("spec", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_specs(spec):
    with pytest.raises(InputError, match="expected i/n"):
        parse_shard(spec)


def test_logit_tokens_read_the_decoder_through_the_unembedding():
    W_U = torch.eye(6)[:, :4] * torch.arange(1, 7)[:, None]   # token t reads dimension t (t < 4)
    W_dec = torch.eye(4)
    lt = logit_tokens(W_dec, W_U, n=2)
    assert lt.top_ids[:, 0].tolist() == [0, 1, 2, 3]
    assert lt.top_vals[:, 0].tolist() == [1, 2, 3, 4]
    # every other token reads 0 on direction d: the bottom two are zeros and never token d itself
    assert (lt.bottom_vals == 0).all() and all(d not in lt.bottom_ids[d] for d in range(4))


def test_flushing_feature_rows_in_chunks_changes_nothing(full, monkeypatch):
    from sae.harvest import _Bank

    for method in (_Bank.flush, _Bank.merge_buffer, _Bank.merge):
        monkeypatch.setattr(method, "__defaults__", (7,))
    chunked = run(range(24)).result()
    for k in full.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(chunked.examples, k), getattr(full.examples, k), err_msg=k)


def test_result_chunks_concatenate_to_the_result(full):
    parts = list(run(range(24)).result_chunks(chunk=7))
    assert [p.offset for p in parts] == list(range(0, F, 7))
    for k in ("density", "n_fired", "max_act", "mean_act", "hist", "hist_max"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, k) for p in parts]), getattr(full, k), err_msg=k)
    for k in full.examples.__dataclass_fields__:
        np.testing.assert_array_equal(np.concatenate([getattr(p.examples, k) for p in parts]),
                                      getattr(full.examples, k), err_msg=k)
    assert set().union(*(p.contexts for p in parts)) == full.contexts.keys()
    assert parts[3].feature_examples(22) == full.feature_examples(22)


def test_flushing_after_every_batch_changes_nothing(full):
    """Merging candidates into rows that already hold entries (a flush per update) gives the one-flush result."""
    st = HarvestState(F, L, CFG)
    st.top.flush_at = st.res.flush_at = 1
    for bi in range(24):
        st.update(*synthetic_batch(bi))
    got = st.result()
    for k in full.examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got.examples, k), getattr(full.examples, k), err_msg=k)


def test_state_bytes_per_feature_fit_a_million_features_in_8_gib():
    """The default settings' per-feature state: 1 M features must stream in <= 8 GiB, buffers included."""
    from sae.harvest import _Bank

    st = HarvestState(64, 64, HarvestConfig())
    banks = [st.top, st.res]
    per_feature = sum(t.numel() * t.element_size() for b in banks for t in (*b.tensors().values(), b.worst))
    per_feature += sum(t.numel() * t.element_size() for t in (st.n_fired, st.sumq, st.hist, st.hist_hi))
    per_feature /= 64
    assert per_feature * 1_000_000 + 2 * _Bank.BUFFER_BYTES < 7 * 2**30


def test_a_merge_rewrites_only_the_rows_it_has_candidates_for():
    st = run(range(6))
    st.top.flush()
    before = {k: v.clone() for k, v in st.top.tensors().items()}
    ids, tokens, vals, idx = synthetic_batch(99)
    keep = (idx == 3) | (idx == 11)          # only features 3 and 11 fire in this batch
    st.update(ids + 1000, tokens, vals * keep, idx)
    st.top.flush()
    others = torch.ones(F, dtype=torch.bool)
    others[[3, 11]] = False
    for k, v in st.top.tensors().items():
        assert torch.equal(v[others], before[k][others]), k
    assert not torch.equal(st.top.key[[3, 11]], before["key"][[3, 11]])


@pytest.mark.parametrize("key_bits", [20, 40])    # 40: keys past 2^32, where the merge cannot pack them
def test_bank_keeps_each_rows_smallest_entries_over_many_merges(key_bits):
    """Candidates offered over several merges (rows receive 0 to many at a time): after flush each row holds
    exactly the cap smallest (prim, key) it was offered, sorted, each with the window it came with."""
    from sae.harvest import _Bank

    g = torch.Generator().manual_seed(key_bits)
    n, cap, width = 40, 6, 3
    bank = _Bank(n, cap, width, torch.float32, math.inf, "cpu")
    offered = []
    for _ in range(12):
        m = int(torch.randint(1, 60, (1,), generator=g))
        f = torch.randint(0, n // 2, (m,), generator=g) * 2          # odd rows never get a candidate
        prim = torch.randint(0, 8, (m,), generator=g).float() * -1.0    # ties in prim, broken by key
        key = torch.randint(0, 1 << key_bits, (m,), generator=g)
        win = torch.randint(0, 255, (m, width), generator=g, dtype=torch.uint8)
        offered += list(zip(f.tolist(), prim.tolist(), key.tolist(), win))
        bank.offer(f, prim, key, -prim, lambda i, win=win, prim=prim: (win[i], -prim[i]))
        bank.merge_buffer()
    bank.flush()
    for row in range(n):
        best = sorted({(p, k): w for r, p, k, w in offered if r == row}.items())[:cap]
        got = [(float(p), int(k)) for p, k in zip(bank.prim[row], bank.key[row]) if k >= 0]
        assert got == [pk for pk, _ in best], row
        for j, (_, w) in enumerate(best):
            assert torch.equal(bank.win[row, j], w)
        assert (bank.key[row, len(best):] < 0).all()
