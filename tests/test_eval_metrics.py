"""sae.evaluate: the pure metric math against hand-computed cases, and evaluate() against a direct computation."""
from __future__ import annotations

import math
import pydoc_data.topics

import pytest
import torch
import transformers as T

from sae.archs import SAEConfig, build
from sae.corpus import iter_contexts
from sae.errors import InputError
from sae.evaluate import Moments, ce_loss_score, evaluate, fvu_from_sums
from sae.formats import save_native
from sae.models import content_mask, hooked, load_tokenizer


def test_fvu_hand_computed():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    recon = torch.tensor([[1.0, 0.0], [2.0, 1.0], [4.0, 0.0]])
    m = Moments()
    m.update(x[:1])
    m.update(x[1:])
    # mean (2, 0); Σ‖x − x̄‖² = 4 + 0 + 4 = 8; Σ‖x − x̂‖² = 1 + 1 + 0 = 2
    assert m.n == 3 and m.m2 == pytest.approx(8.0)
    sse = float((x - recon).pow(2).sum())
    assert fvu_from_sums(sse, m.m2) == pytest.approx(0.25)  # variance about zero would give 2/20
    assert math.isnan(fvu_from_sums(1.0, 0.0))


def test_moments_survive_a_large_offset():
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(3000, 16, generator=g, dtype=torch.float64)).float()
    m = Moments()
    for chunk in x.split(7):
        m.update(chunk)
    exact = float((x.double() - x.double().mean(0)).pow(2).sum())
    assert m.m2 == pytest.approx(exact, rel=1e-9)
    naive32 = float(x.pow(2).sum() - x.shape[0] * x.mean(0).pow(2).sum())  # the cancellation this avoids
    assert abs(naive32 - exact) / exact > 1e-3


def test_ce_loss_score():
    assert ce_loss_score(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0) == pytest.approx(0.75)
    assert ce_loss_score(2.0, 2.0, 2.0) is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with the MiniLM tokenizer; a large init so that ablations move the loss."""
    d = tmp_path_factory.mktemp("gpt2")
    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64, initializer_range=0.3)
    T.GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _identity_sae(d: int, **where) -> torch.nn.Module:
    """TopK with latents ±e_i and k = d: exactly one of each pair is positive, so it reconstructs x exactly."""
    sae = build(SAEConfig(d_in=d, n_latents=2 * d, k=d, ctx_len=32, **where))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_on_causal_lm(tmp_path, gpt2_dir, corpus):
    save_native(_identity_sae(32, model=gpt2_dir, layer=0), tmp_path / "sae")
    m = evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=600, device="cpu", progress=False)
    assert m["fvu"] < 1e-10
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["ce_zero_ablation"] > m["ce_clean"] + 0.05
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["l0"] <= 32 and 600 <= m["tokens"] < 600 + 32


def test_random_sae_on_causal_lm_moves_the_loss(tmp_path, gpt2_dir, corpus):
    torch.manual_seed(1)
    save_native(build(SAEConfig(d_in=32, n_latents=64, k=2, ctx_len=32, model=gpt2_dir, layer=0)), tmp_path / "s")
    m = evaluate(str(tmp_path / "s"), corpus=corpus, tokens=300, device="cpu", progress=False)
    assert m["fvu"] > 0.1 and m["kl_div"] > 1e-3 and abs(m["ce_sae"] - m["ce_clean"]) > 1e-3
    assert m["ce_loss_score"] == pytest.approx(
        (m["ce_zero_ablation"] - m["ce_sae"]) / (m["ce_zero_ablation"] - m["ce_clean"]))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_evaluate_matches_direct_computation_on_bert(tmp_path, corpus, arch):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=384, n_latents=256, arch=arch, k=8, ctx_len=32, model="minilm", layer=2, site="mlp"))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(-3, 1, 256))  # from always-on to rarely-on latents
    save_native(sae, tmp_path / "sae", extra={"seed": 3})
    got = evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=400, device="cpu", batch_size=4, progress=False)
    again = evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=400, device="cpu", batch_size=5, progress=False)
    assert "ce_loss_score" not in got  # not a causal LM

    hm = hooked("minilm", 2, "mlp", device="cpu")
    ctxs, n = [], 0
    for ctx in iter_contexts(corpus, hm.tokenizer, ctx_len=32, seed=3, split="eval"):
        ctxs.append(ctx)
        n += 31  # every context opens with [CLS]
        if n >= 400:
            break
    tokens = torch.tensor(ctxs)
    x = hm.activations(tokens)[content_mask(tokens, hm.tokenizer)].double()
    with torch.no_grad():
        acts = sae.encode(x.float())
        recon = sae.decode(acts).double()
    fired = (acts > 0).double()
    want_fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert got["tokens"] == again["tokens"] == x.shape[0] == 31 * 13
    assert got["fvu"] == pytest.approx(want_fvu, rel=1e-6)
    assert again["fvu"] == pytest.approx(want_fvu, rel=1e-6)
    assert got["l0"] == pytest.approx(float(fired.sum(1).mean()))
    assert got["dead_frac"] == pytest.approx(float((fired.sum(0) == 0).double().mean()))
    assert got["dense_frac"] == pytest.approx(float((fired.mean(0) > 0.1).double().mean()))
    assert 0 < got["dense_frac"] < 1 and 0 < got["l0"]


def test_d_in_mismatch(tmp_path, corpus):
    save_native(build(SAEConfig(d_in=48, n_latents=64, k=4, model="minilm", layer=1)), tmp_path / "sae")
    with pytest.raises(InputError, match=r"^SAE d_in 48 does not match model minilm layer 1 site resid \(d=384\)"):
        evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=100, device="cpu", progress=False)


def test_sae_without_model_needs_model_flag(tmp_path, corpus):
    save_native(build(SAEConfig(d_in=384, n_latents=64, k=4)), tmp_path / "sae")
    with pytest.raises(InputError, match="give --model"):
        evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=100, device="cpu", progress=False)
    m = evaluate(str(tmp_path / "sae"), corpus=corpus, tokens=100, model="minilm", layer=0, device="cpu",
                 progress=False)
    assert m["model"] == "minilm" and m["layer"] == 0 and 0 < m["fvu"]
