"""Hook sites on tiny random models of each family, and the pretrained MiniLM (BERT)."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from sae.errors import InputError
from sae.models import HookedModel, content_mask, find_blocks, hooked, load_tokenizer

D, LAYERS, VOCAB = 32, 3, 100


def _small(cls, **kw):
    return cls(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=LAYERS, n_embd=D, n_head=4, vocab_size=VOCAB, n_positions=64,
                                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: _small(T.GPTNeoXConfig),
    "llama": lambda: _small(T.LlamaConfig, num_key_value_heads=2),
    "qwen2": lambda: _small(T.Qwen2Config, num_key_value_heads=2),
    "mistral": lambda: _small(T.MistralConfig, num_key_value_heads=2),
    "gemma": lambda: _small(T.GemmaConfig, num_key_value_heads=2, head_dim=8),
    "gemma2": lambda: _small(T.Gemma2Config, num_key_value_heads=2, head_dim=8),
}
# blocks of the form h + attn(norm(h)) + mlp(norm(h')): the three sites must add up. Gemma2 normalises the
# sublayer outputs again before adding them, so only shapes are checked there.
ADDITIVE = {"gpt2", "gpt_neox", "llama", "qwen2", "mistral", "gemma"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def causal(request):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    return request.param, model


def _tokens(vocab=VOCAB, batch=2, seq=10):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer", [0, 1])
def test_sites_match_hidden_states(causal, layer):
    name, model = causal
    tokens = _tokens()
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
    acts = {site: HookedModel(model, None, layer, site).activations(tokens) for site in ("resid", "attn", "mlp")}
    for a in acts.values():
        assert a.shape == (2, 10, D) and a.dtype == torch.float32
    torch.testing.assert_close(acts["resid"], hidden[layer + 1], rtol=1e-5, atol=1e-5)
    if name in ADDITIVE:
        torch.testing.assert_close(hidden[layer] + acts["attn"] + acts["mlp"], hidden[layer + 1], rtol=1e-4, atol=1e-4)


def test_forward_stops_after_hooked_block(causal):
    _, model = causal
    called = []
    blocks = find_blocks(model)
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: called.append(i)) for i, b in enumerate(blocks)]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(lambda *_a: called.append("head")))
    try:
        HookedModel(model, None, 1, "mlp").activations(_tokens())
    finally:
        for h in handles:
            h.remove()
    assert called == [0, 1]


def test_logits_with_replacement_changes_output(causal):
    _, model = causal
    hm = HookedModel(model, None, 1, "resid")
    tokens = _tokens()
    clean = hm.logits_with(tokens)
    same = hm.logits_with(tokens, replace=lambda x: x)
    zeroed = hm.logits_with(tokens, replace=torch.zeros_like)
    torch.testing.assert_close(same, clean)
    assert clean.shape == (2, 10, VOCAB)
    assert not torch.allclose(zeroed, clean, atol=1e-3)


def test_unknown_layer_or_site_lists_valid_ones(causal):
    _, model = causal
    with pytest.raises(InputError, match=r"valid layers: 0\.\.2"):
        HookedModel(model, None, LAYERS, "resid")
    with pytest.raises(InputError, match=r"valid sites: resid, mlp, attn"):
        HookedModel(model, None, 0, "embed")


@pytest.fixture(scope="module")
def minilm():
    return hooked("minilm", 3, "resid", device="cpu")


def test_bert_sites(minilm):
    tok = minilm.tokenizer
    tokens = tok(["the cat sat on the mat", "def f(x): return x"], padding="max_length", max_length=12,
                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = minilm.model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                              output_hidden_states=True).hidden_states
    assert len(hidden) == 7  # 6 blocks
    torch.testing.assert_close(minilm.activations(tokens), hidden[4], rtol=1e-5, atol=1e-5)
    for site in ("mlp", "attn"):
        acts = HookedModel(minilm.model, tok, 3, site).activations(tokens)
        assert acts.shape == (2, 12, 384)
        assert not torch.allclose(acts, hidden[4])
    assert minilm.d_in == 384


def test_bert_stops_after_hooked_block(minilm):
    called = []
    blocks = find_blocks(minilm.model)
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: called.append(i)) for i, b in enumerate(blocks)]
    try:
        HookedModel(minilm.model, minilm.tokenizer, 1, "attn").activations(torch.tensor([[101, 2000, 102]]))
    finally:
        for h in handles:
            h.remove()
    assert called == [0, 1]


def test_bert_out_of_range_layer(minilm):
    with pytest.raises(InputError, match=r"layer 6 is out of range .* valid layers: 0\.\.5"):
        HookedModel(minilm.model, minilm.tokenizer, 6, "resid")


def test_content_mask_drops_leading_cls_only():
    tok = load_tokenizer("minilm")
    tokens = torch.tensor([[tok.cls_token_id, 5, tok.cls_token_id], [7, 8, 9]])
    assert content_mask(tokens, tok).tolist() == [[False, True, True], [True, True, True]]


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="cannot load model"):
        hooked(str(tmp_path / "nope"), 0)


def test_uncached_hub_name_is_one_line_error():
    with pytest.raises(InputError, match="cannot load model 'surely-not-a-cached-model'"):
        hooked("surely-not-a-cached-model", 0)
