"""firing_sha: the same SAE hashes alike whichever formats it went through, and it changes exactly when what decides
which latents fire changes (k of TopK, a threshold, the encoder), not with the decoder or a training-only k."""
from __future__ import annotations

import itertools

import pytest
import torch

from sae.archs import SAEConfig, build, log_threshold_of, threshold_of
from sae.formats import FORMATS, SAVERS, convert, load_sae

D, N = 16, 48
FORMATS_OF = {"topk": FORMATS, "batchtopk": ("native", "saelens"), "jumprelu": ("native", "saelens"),
              "relu": ("native", "saelens")}


def _unreachable_threshold() -> float:
    """A float32 threshold that no float32 log_threshold reproduces: a JumpReLU read from SAELens can only come
    near it, and the hash must not tell the two apart."""
    for t in torch.linspace(0.02, 0.1, 64):
        t = t.reshape(1)
        if threshold_of(log_threshold_of(t)) != t:
            return float(t)
    raise AssertionError("every threshold in the range was reachable; pick another range")


def _sae(arch: str):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=D, n_latents=N, arch=arch, k=5, model="some/model", layer=3, site="mlp"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(N).mul(2.0).add(0.05).log())  # thresholds on both sides of 1
        if arch == "batchtopk":
            sae.threshold.fill_(_unreachable_threshold())
    return sae.eval()


CHAINS = [(arch, chain) for arch, fmts in FORMATS_OF.items() for n in (1, 2, 3)
          for chain in itertools.product(fmts, repeat=n)]


@pytest.mark.parametrize("arch,chain", CHAINS, ids=[f"{a}-{'-'.join(c)}" for a, c in CHAINS])
def test_every_format_chain_keeps_the_hash(tmp_path, arch, chain):
    sae = _sae(arch)
    want = sae.firing_sha()
    SAVERS[chain[0]](sae, tmp_path / "0")
    for i, fmt in enumerate(chain[1:]):
        convert(tmp_path / str(i), fmt, tmp_path / str(i + 1))
    back = load_sae(tmp_path / str(len(chain) - 1))
    assert back.firing_sha() == want


def test_jumprelu_through_saelens_keeps_the_hash_though_k_is_made_up(tmp_path):
    """SAELens does not record JumpReLU's training target k, so the loader stands one in; it must not count."""
    sae = _sae("jumprelu")
    SAVERS["saelens"](sae, tmp_path / "lens")
    back = load_sae(tmp_path / "lens")
    assert back.cfg.arch == "jumprelu" and back.cfg.k != sae.cfg.k
    assert back.firing_sha() == sae.firing_sha()


def test_batchtopk_hashes_as_the_jumprelu_saelens_holds_it_as(tmp_path):
    sae = _sae("batchtopk")
    SAVERS["saelens"](sae, tmp_path / "lens")
    back = load_sae(tmp_path / "lens")
    assert back.cfg.arch == "jumprelu" and back.firing_sha() == sae.firing_sha()


@pytest.mark.parametrize("arch,change", [
    ("topk", lambda s: setattr(s.cfg, "k", s.cfg.k + 1)),
    ("batchtopk", lambda s: s.threshold.mul_(1.01)),
    ("jumprelu", lambda s: s.log_threshold[7].add_(1e-3)),
    ("relu", lambda s: s.W_enc[0, 0].add_(1e-6)),
    ("topk", lambda s: s.b_enc[5].add_(1e-6)),
    ("jumprelu", lambda s: s.b_dec[0].add_(1e-6)),  # encode reads x - b_dec
], ids=["topk-k", "batchtopk-threshold", "jumprelu-threshold", "relu-W_enc", "topk-b_enc", "jumprelu-b_dec"])
def test_what_decides_firing_changes_the_hash(arch, change):
    sae = _sae(arch)
    before = sae.firing_sha()
    with torch.no_grad():
        change(sae)
    assert sae.firing_sha() != before


@pytest.mark.parametrize("arch", sorted(FORMATS_OF))
def test_decoder_and_training_only_settings_leave_it(arch):
    sae = _sae(arch)
    before = sae.firing_sha()
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    sae.cfg.l1_coef += 1.0
    if arch != "topk":  # k is a training target for the threshold and L1 kinds
        sae.cfg.k += 3
    assert sae.firing_sha() == before


def test_kinds_with_the_same_tensors_hash_apart():
    topk, relu = _sae("topk"), _sae("relu")
    relu.load_state_dict(topk.state_dict())
    assert topk.firing_sha() != relu.firing_sha()


def test_a_bf16_sae_hashes_as_its_float32_copy():
    sae = build(SAEConfig(d_in=D, n_latents=N, arch="jumprelu", k=5), dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16
    want = sae.firing_sha()
    assert sae.float().W_enc.dtype == torch.float32 and sae.firing_sha() == want
