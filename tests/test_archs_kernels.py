"""The sparse kernels equal their dense definitions, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from sae import native
from sae.archs import SAEConfig, TopKSAE
from sae.kernels import TOPK_GROUP, flat_pattern, sparse_decode, sparse_linear, topk_flat, topk_pattern, topk_rows
from tests.helpers import missing_tool


def _inputs(n=10, d=4, m=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(n, d), mk(m, d), mk(m), mk(m, d)


def test_topk_pattern_gradcheck():
    x, W, b, Wd = _inputs()
    idx = F.linear(x, W, b).detach().topk(3, dim=-1).indices
    p = topk_pattern(idx, W.shape[0])

    def f(x, W, b, Wd):
        return sparse_decode(sparse_linear(x, W, b, p).relu(), Wd, p)

    assert torch.autograd.gradcheck(f, (x, W, b, Wd))


def test_variable_rows_gradcheck_including_empty_rows():
    x, W, b, Wd = _inputs(seed=1)
    pre = F.linear(x, W, b).detach()
    pre[0] += 100      # row 0 takes many entries, row 1 none
    pre[1] -= 100
    flat = pre.flatten().topk(3 * x.shape[0]).indices  # batch-wide selection: uneven rows
    p, _ = flat_pattern(flat, x.shape[0], W.shape[0])
    counts = p.crow.diff()
    assert counts.min() == 0 and counts.max() > 3  # the case worth testing: empty and long rows

    def f(x, W, b, Wd):
        return sparse_decode(sparse_linear(x, W, b, p), Wd, p)

    assert torch.autograd.gradcheck(f, (x, W, b, Wd))


def test_topk_training_step_matches_dense_reference():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=96, k=6))
    x = torch.randn(50, 16) * 3 + 1
    out = sae.training_step(x)
    out.fvu.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    # the dense definition: topk of the pre-activations, relu, dense decoder matmul
    pre = F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
    vals, idx = pre.topk(6, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    recon = acts @ sae.W_dec + sae.b_dec
    fvu = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    fvu.backward()
    assert torch.allclose(out.recon, recon, atol=1e-5)
    assert torch.allclose(out.fvu, fvu, rtol=1e-5)
    for n, p in sae.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_auxk_gradient_reaches_dead_encoder_rows():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=96, k=4))
    x = torch.randn(64, 16)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_step(x, dead=dead)
    assert out.aux_loss > 0
    out.loss.backward()
    # the encoder rows of dead latents get gradient from AuxK alone (sparsify's fused encoder drops it)
    assert sae.W_enc.grad[dead].abs().sum() > 0


def _same_topk(x, k):
    vals, idx = topk_rows(x, k)
    ref = x.topk(k, dim=-1, sorted=False).values
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)      # the k largest values, each row
    assert torch.equal(x.gather(1, idx), vals)                          # at the indices returned
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()                 # each index once


@pytest.fixture(params=["C kernel", "torch ops"])
def topk_path(request, monkeypatch):
    """topk_rows on the CPU through the C kernel of sae/native.py, and through its torch fallback."""
    if request.param == "C kernel":
        if not native.available():
            missing_tool("the C top-k of sae/native.py did not build (is a C compiler with OpenMP installed?)")
    else:
        monkeypatch.setattr(native, "topk_indices", lambda x, k: None)
    return request.param


def test_topk_rows_equals_torch_topk(topk_path):
    G = TOPK_GROUP["cpu"]     # the tensors below are on the CPU
    g = torch.Generator().manual_seed(0)
    n, k = 64 * G, 16
    _same_topk(torch.randn(50, n, generator=g), k)
    # ties everywhere: a few distinct values, so the k-th value is shared by many entries and groups
    _same_topk(torch.randint(0, 4, (50, n), generator=g).float(), k)
    # a row's whole top k inside one strided group (columns g, g + n/G, ...), and in k different groups
    x = torch.randn(4, n, generator=g)
    width = n // G
    x[0, 3 + width * torch.arange(G)[:k]] += 100
    x[1, torch.arange(k)] += 100
    x[2] = -torch.arange(n, dtype=torch.float32)       # all negative, descending
    _same_topk(x, k)
    # long enough rows that the group maxima are themselves cut into groups, ties included
    _same_topk(torch.randn(20, 8 * k * G ** 2, generator=g), k)
    _same_topk(torch.randint(0, 3, (20, 8 * k * G ** 2), generator=g).float(), k)
    # where the two passes would not pay (k x G too large a share of the row): torch's top-k, same answer
    _same_topk(torch.randn(8, 2 * k * G, generator=g), k)
    # more than two dimensions (tokens of a batch of contexts): torch's top-k along the last
    x3 = torch.randn(2, 3, n, generator=g)
    v3, i3 = topk_rows(x3, k)
    assert torch.equal(v3.sort(-1).values, x3.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(x3.gather(-1, i3), v3)


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_rows_c_kernel_on_awkward_rows(topk_path, threads):
    """Shapes and values that reach every branch of csrc/topk.c: rows not a whole number of its 32-entry blocks,
    fewer blocks than k, k = n, heavy tails (its threshold narrows over several levels), ties, -inf entries."""
    g = torch.Generator().manual_seed(1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in [(16_384, 32), (1000, 7), (31, 5), (100, 10), (64, 64), (4096, 1), (777, 200)]:
            _same_topk(torch.randn(33, n, generator=g), k)
        heavy = torch.randn(40, 8192, generator=g).exp() ** 4         # a few huge entries, most near zero
        heavy[::3, 5] = 1e30
        _same_topk(heavy, 32)
        _same_topk(torch.randint(0, 2, (40, 4096), generator=g).float(), 32)
        _same_topk(torch.full((3, 4096), 2.5), 16)
        x = torch.randn(10, 4096, generator=g)
        x[:, 100:2000] = -torch.inf                                    # whole blocks of -inf, and a part block
        _same_topk(x, 32)
        _same_topk(torch.randn(10, 300, generator=g).masked_fill(torch.rand(10, 300, generator=g) < 0.9,
                                                                -torch.inf), 40)
    finally:
        torch.set_num_threads(old)


def test_the_c_kernels_portable_path_equals_torch(tmp_path, monkeypatch):
    """csrc/topk.c built without AVX2, as on a CPU without it: the same answers."""
    monkeypatch.setenv("SAE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_flags", lambda: ["-O2", "-shared", "-fPIC", "-fopenmp"])
    native._topk_lib.cache_clear()
    try:
        if not native.available():
            missing_tool("the C top-k of sae/native.py did not build (is a C compiler with OpenMP installed?)")
        g = torch.Generator().manual_seed(3)
        for n, k in [(16_384, 32), (1000, 7), (31, 5), (4096, 1)]:
            _same_topk(torch.randn(17, n, generator=g), k)
        _same_topk(torch.randint(0, 2, (9, 4096), generator=g).float(), 32)
        x = torch.randn(4, 2048, generator=g)
        x[1, 5] = float("nan")
        assert native.topk_indices(x, 8) is None
    finally:
        native._topk_lib.cache_clear()


def test_topk_rows_with_nan_or_inf_answers_as_torch(topk_path):
    """The C kernel declines rows with NaN (torch ranks NaN highest) or an infinite block max, and torch answers."""
    g = torch.Generator().manual_seed(2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(8, 2048, generator=g)
        x[3, 700] = bad
        x[5, 64:96] = bad                                              # a whole block
        if topk_path == "C kernel":
            assert native.topk_indices(x, 16) is None
        vals, idx = topk_rows(x, 16)
        ref = x.topk(16, dim=-1, sorted=False).values
        torch.testing.assert_close(vals.sort(-1).values, ref.sort(-1).values, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(x.gather(1, idx), vals, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_flat_equals_torch_topk(topk_path, threads):
    """BatchTopK's selection over a whole batch: relu'd pre-activations (half of them tied at 0), a k larger
    than the positive entries (zeros then fill it), lengths that do not split evenly, and the gradient."""
    g = torch.Generator().manual_seed(4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in [(64 * 4096, 4096), (10_001, 100), (3, 2), (1000, 1000)]:
            x = torch.randn(n, generator=g).relu().requires_grad_()
            vals, idx = topk_flat(x, k)
            assert torch.equal(vals.sort().values, x.topk(k).values.sort().values)
            assert torch.equal(x[idx], vals) and idx.unique().numel() == k
            vals.sum().backward()
            assert torch.equal(x.grad, torch.zeros(n).index_fill_(0, idx, 1.0))
        x = torch.randn(4096, generator=g).relu()
        vals, idx = topk_flat(x, 3000)                           # more than the positive entries
        assert torch.equal(vals.sort().values, x.topk(3000).values.sort().values)
    finally:
        torch.set_num_threads(old)


def test_topk_rows_gradient_reaches_the_selected_entries(topk_path):
    x = torch.randn(6, 4096, requires_grad=True)
    vals, idx = topk_rows(x, 8)
    vals.sum().backward()
    assert torch.equal(x.grad, torch.zeros(6, 4096).scatter_(1, idx, 1.0))


def test_topk_sae_encodes_with_topk_rows():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=4096, k=8))
    x = torch.randn(32, 16)
    vals, idx = sae.encode_sparse(x)
    ref = sae.pre_acts(x).topk(8, dim=-1)
    assert torch.equal(vals.sort(-1).values, ref.values.relu().sort(-1).values)
    assert torch.equal(sae.encode(x), torch.zeros(32, 4096).scatter_(-1, ref.indices, ref.values.relu()))


def test_encoding_into_a_reused_buffer_equals_a_fresh_one():
    from sae.archs import ARCHS, build

    torch.manual_seed(0)
    buf = torch.full((40, 512), float("nan"))       # left over from an earlier, larger batch
    for arch in ARCHS:
        sae = build(SAEConfig(d_in=16, n_latents=512, k=8, arch=arch)).eval()
        with torch.no_grad():
            for n in (40, 7):                       # the last batch of a harvest is shorter
                x = torch.randn(n, 16)
                assert torch.equal(sae.pre_acts(x, buf), sae.pre_acts(x)), arch
                fresh, reused = sae.encode_sparse(x), sae.encode_sparse(x, buf)
                assert all(torch.equal(a, b) for a, b in zip(fresh, reused)), arch
