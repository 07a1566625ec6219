"""Every converter, both ways: the same encode and decode outputs on the same inputs after any chain of formats."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.archs import SAEConfig, build
from sae.formats import FORMATS, SAVERS, convert, detect, load_sae, save_native

D, N = 16, 48
FORMATS_OF = {"topk": FORMATS, "batchtopk": ("native", "saelens"), "jumprelu": ("native", "saelens"),
              "relu": ("native", "saelens")}


def _sae(arch: str):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=D, n_latents=N, arch=arch, k=5, model="some/model", layer=3, site="mlp", ctx_len=64))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(N, 1) + 0.5)  # decoder norms that are not all 1
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(N).mul(0.5).add(0.05).log())
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


def _x():
    return torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 2


def _assert_same(a, b):
    x = _x()
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
        assert (za > 0).sum() > 0, "inputs must fire some latents for the comparison to mean anything"
        torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.decode(za), b.decode(za), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


PAIRS = [(arch, src, dst) for arch, fmts in FORMATS_OF.items() for src, dst in itertools.product(fmts, fmts)]


@pytest.mark.parametrize("arch,src,dst", PAIRS, ids=[f"{a}-{s}-to-{d}" for a, s, d in PAIRS])
def test_convert_pair(tmp_path, arch, src, dst):
    sae = _sae(arch)
    SAVERS[src](sae, tmp_path / "a")
    assert detect(tmp_path / "a")[0] == src
    convert(tmp_path / "a", dst, tmp_path / "b")
    assert detect(tmp_path / "b")[0] == dst
    back = load_sae(tmp_path / "b")
    _assert_same(sae, back)
    assert detect(tmp_path / "b" / "cfg.json") == detect(tmp_path / "b")  # a file in the folder names it too
    assert (back.cfg.d_in, back.cfg.n_latents, back.cfg.layer, back.cfg.site, back.cfg.model) == \
        (D, N, 3, "mlp", "some/model")
    if arch == "topk":
        assert back.cfg.arch == "topk" and back.cfg.k == 5


@pytest.mark.parametrize("arch", sorted(FORMATS_OF))
def test_chain_through_every_format_and_back(tmp_path, arch):
    sae = _sae(arch)
    save_native(sae, tmp_path / "0")
    chain = list(FORMATS_OF[arch][1:]) + ["native"]
    for i, fmt in enumerate(chain):
        convert(tmp_path / str(i), fmt, tmp_path / str(i + 1))
    back = load_sae(tmp_path / str(len(chain)))
    _assert_same(sae, back)


def test_native_keeps_arch_and_extras(tmp_path):
    sae = _sae("batchtopk")
    save_native(sae, tmp_path / "s", extra={"seed": 7, "tokens": 1000})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["format"] == "interp" and cfg["seed"] == 7 and cfg["arch"] == "batchtopk"
    back = load_sae(tmp_path / "s")
    assert back.cfg == sae.cfg and not back.training
    assert back.threshold.dtype == torch.float32 and float(back.threshold) == pytest.approx(0.2)


def test_saelens_layout_on_disk(tmp_path):
    from sae.formats import save_saelens

    save_saelens(_sae("jumprelu"), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, N) and w["W_dec"].shape == (N, D) and w["threshold"].shape == (N,)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["hook_name"], cfg["hook_layer"]) == \
        ("jumprelu", D, N, "blocks.3.hook_mlp_out", 3)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_out"


def test_sparsify_layout_on_disk(tmp_path):
    from sae.formats import save_sparsify

    save_sparsify(_sae("topk"), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "s" / "sae.safetensors"))
    assert set(w) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert w["encoder.weight"].shape == (N, D) and w["W_dec"].shape == (N, D)
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D, N, 5, "topk")


def _saelens_reference(w: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' own encode/decode, written out from its formulas, for the legacy and folded-bias variants."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"])
    elif cfg.get("activation_fn_str") == "topk":
        vals, idx = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        acts = pre.relu()
    return acts, (acts * w.get("scaling_factor", 1.0)) @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("variant", ["jumprelu-gemmascope", "standard-topk-v5", "standard-relu-scaled"])
def test_foreign_saelens_dirs(tmp_path, variant):
    """SAELens directories as other tools write them: b_dec not applied to the input (Gemma Scope),
    TopK as 'standard' + activation_fn_str (SAELens 5), a finetuning scaling factor."""
    g = torch.Generator().manual_seed(2)
    w = {"W_enc": torch.randn(D, N, generator=g) * 0.3, "b_enc": torch.randn(N, generator=g) * 0.1,
         "W_dec": torch.randn(N, D, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g)}
    cfg = {"d_in": D, "d_sae": N, "model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post",
           "hook_layer": 12, "normalize_activations": "none", "dtype": "float32", "device": "cpu"}
    if variant == "jumprelu-gemmascope":
        cfg.update(architecture="jumprelu", apply_b_dec_to_input=False)
        w["threshold"] = torch.rand(N, generator=g) * 0.3
    elif variant == "standard-topk-v5":
        cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 6},
                   apply_b_dec_to_input=True)
    else:
        cfg.update(architecture="standard", activation_fn_str="relu", apply_b_dec_to_input=True,
                   finetuning_scaling_factor=True)
        w["scaling_factor"] = torch.rand(N, generator=g) + 0.5
    (tmp_path / "s").mkdir()
    save_file(w, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))

    sae = load_sae(tmp_path / "s")
    assert (sae.cfg.model, sae.cfg.layer, sae.cfg.site) == ("gemma-2-2b", 12, "resid")
    x = torch.randn(32, D, generator=g) * 2
    want_acts, want_recon = _saelens_reference(w, cfg, x)
    assert (want_acts > 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), want_recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook,layer,site", [
    ("blocks.12.hook_resid_post", 12, "resid"), ("blocks.12.hook_resid_pre", 11, "resid"),
    ("blocks.4.hook_mlp_out", 4, "mlp"), ("blocks.4.hook_attn_out", 4, "attn"),
    ("blocks.4.attn.hook_z", 4, "attn.hook_z")])
def test_saelens_hook_names_map_to_our_sites(tmp_path, hook, layer, site):
    from sae.formats import save_saelens

    save_saelens(_sae("relu"), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    # SAELens 6 keeps where the SAE reads only under "metadata"
    for key in ("hook_name", "hook_layer", "model_name"):
        del cfg[key]
    cfg["metadata"].update(hook_name=hook, hook_layer=int(hook.split(".")[1]), model_name="gpt2")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    got = load_sae(tmp_path / "s").cfg
    assert (got.model, got.layer, got.site) == ("gpt2", layer, site)
    convert(tmp_path / "s", "saelens", tmp_path / "again")
    assert load_sae(tmp_path / "again").cfg == got


@pytest.mark.parametrize("folder,layer,site", [
    ("layers.7", 7, "resid"), ("transformer.h.2.mlp", 2, "mlp"), ("gpt_neox.layers.4.attention", 4, "attn"),
    ("model.layers.1.self_attn", 1, "attn")])
def test_sparsify_hookpoint_folder_says_where(tmp_path, folder, layer, site):
    from sae.formats import save_sparsify

    save_sparsify(_sae("topk"), tmp_path / "run" / folder)
    cfg_path = tmp_path / "run" / folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("model", "layer", "site", "ctx_len"):  # what real sparsify writes lacks these
        del cfg[key]
    cfg_path.write_text(json.dumps(cfg))
    got = load_sae(tmp_path / "run").cfg
    assert (got.layer, got.site, got.model) == (layer, site, "")
