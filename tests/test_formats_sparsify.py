"""The real eai-sparsify SparseCoder and ours give the same outputs on the same directory, in both directions."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from sae.archs import SAEConfig, build
from sae.formats import detect, load_sae, save_sparsify
from tests.helpers import missing_tool


@pytest.fixture(scope="module")
def sparsify():
    """sparsify.sparse_coder, loaded without the package __init__ (which imports `datasets` for training)."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None or spec.submodule_search_locations is None:
        missing_tool("eai-sparsify is not installed (pip install --no-deps eai-sparsify natsort simple-parsing einops)")
    ours = lambda n: n == "sparsify" or n.startswith("sparsify.")  # noqa: E731
    previous = {n: m for n, m in sys.modules.items() if ours(n)}
    pkg = types.ModuleType("sparsify")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = pkg
    try:
        with pytest.MonkeyPatch.context() as env:
            if not torch.cuda.is_available():
                # sparsify takes its Triton decoder whenever triton imports, and that needs a GPU; read at import
                env.setenv("SPARSIFY_DISABLE_TRITON", "1")
            from sparsify.config import SparseCoderConfig
            from sparsify.sparse_coder import SparseCoder
    except ImportError as e:
        missing_tool(f"eai-sparsify's SparseCoder is not importable ({e}); "
                 "pip install --no-deps eai-sparsify natsort simple-parsing einops")
    finally:
        # leave no stub package behind for other tests that import sparsify their own way
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(previous)
    return SparseCoder, SparseCoderConfig


def _x(d):
    return torch.randn(40, d, generator=torch.Generator().manual_seed(3)) * 2


def test_their_directory_loads_into_ours(tmp_path, sparsify):
    SparseCoder, SparseCoderConfig = sparsify
    torch.manual_seed(0)
    theirs = SparseCoder(24, SparseCoderConfig(expansion_factor=4, k=6))
    with torch.no_grad():
        theirs.encoder.bias.normal_(0, 0.2)
        theirs.b_dec.normal_(0, 0.5)
    theirs.save_to_disk(tmp_path / "run" / "layers.5")  # sparsify's per-hookpoint layout
    ours = load_sae(tmp_path / "run")
    assert (ours.cfg.d_in, ours.cfg.n_latents, ours.cfg.k, ours.cfg.layer) == (24, 96, 6, 5)

    x = _x(24)
    with torch.no_grad():
        out = theirs(x)
        vals, idx = ours.encode_sparse(x)
        dense_theirs = torch.zeros(40, 96).scatter(-1, out.latent_indices, out.latent_acts)
        torch.testing.assert_close(ours.encode(x), dense_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), out.sae_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode_sparse(vals, idx), theirs.decode(vals, idx), rtol=1e-5, atol=1e-5)


def test_our_export_loads_into_theirs(tmp_path, sparsify):
    SparseCoder, _ = sparsify
    torch.manual_seed(1)
    ours = build(SAEConfig(d_in=24, n_latents=80, k=7, layer=2)).eval()
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.2)
        ours.b_dec.normal_(0, 0.5)
    save_sparsify(ours, tmp_path / "exp")
    assert detect(tmp_path / "exp")[0] == "sparsify"
    theirs = SparseCoder.load_from_disk(tmp_path / "exp")
    assert theirs.num_latents == 80 and theirs.cfg.k == 7
    x = _x(24)
    with torch.no_grad():
        out = theirs(x)
        torch.testing.assert_close(out.sae_out, ours(x), rtol=1e-5, atol=1e-5)
        dense_theirs = torch.zeros(40, 80).scatter(-1, out.latent_indices, out.latent_acts)
        torch.testing.assert_close(dense_theirs, ours.encode(x), rtol=1e-5, atol=1e-5)
