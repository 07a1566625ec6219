"""SAE directories on disk: our native format, SAELens and sparsify. Loading auto-detects all three.

native    cfg.json (SAEConfig + "format": "interp") + sae.safetensors (our state dict, W_enc [n, d])
saelens   cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae], W_dec [d_sae, d_in], threshold for jumprelu
sparsify  cfg.json + sae.safetensors, encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec;
          also a folder holding exactly one hookpoint subfolder (e.g. layers.3/)

Writes go to a temporary sibling and are renamed into place, so a crash never leaves a directory that looks complete.
What differs between kinds (cfg keys, SAELens' threshold) each kind in sae.archs says for itself; this module knows
the files and the four tensors every kind has.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .archs import SAEConfig, SparseAutoencoder, Stored, config_int, load_state, saelens_kind, sparsify_kind
from .errors import InputError, first_line

FORMATS = ("native", "saelens", "sparsify")
CFG, NATIVE_WEIGHTS, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors", "sae_weights.safetensors", \
    "sae.safetensors"

# TransformerLens hook names (what SAELens records) of our sites
_SAELENS_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_SITE_OF_HOOK = {v: k for k, v in _SAELENS_HOOKS.items()}
_SAELENS_SHARED = ("W_enc", "b_enc", "W_dec", "b_dec")
# sparsify's hookpoint folder suffixes (layers.3.mlp) of our sites
_SPARSIFY_SITES = {"mlp": "mlp", "attn": "attn", "self_attn": "attn", "attention": "attn"}


# ---------------------------------------------------------------- writing
@contextmanager
def _atomic_dir(out: str | Path):
    """Yields a temp sibling to fill. A new `out` appears by one rename; an existing one (a training run's folder
    may hold other files) loses its cfg.json first and gets it back last, so it never looks complete half-way."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        if not out.is_dir():
            raise InputError(f"output {out} exists and is not a directory; give a new directory path")
        (out / CFG).unlink(missing_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for stale in {NATIVE_WEIGHTS, SAELENS_WEIGHTS} - set(names):  # another format's weights would mislead detect()
            (out / stale).unlink(missing_ok=True)
        for name in [n for n in names if n != CFG] + [n for n in names if n == CFG]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_native(sae: SparseAutoencoder, out_dir: str | Path, extra: dict | None = None) -> Path:
    """cfg.json (SAEConfig + format + extra) and sae.safetensors (the module's state dict)."""
    with _atomic_dir(out_dir) as tmp:
        save_file(_cpu(sae.state_dict()), str(tmp / NATIVE_WEIGHTS), metadata={"format": "interp"})
        _write_json(tmp / CFG, {**sae.cfg.to_dict(), "format": "interp", **(extra or {})})
    return Path(out_dir)


def save_saelens(sae: SparseAutoencoder, out_dir: str | Path) -> Path:
    c = sae.cfg
    kind_cfg, kind_tensors = sae.to_saelens()
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **kind_tensors}
    hook_name = f"blocks.{c.layer}.{_SAELENS_HOOKS.get(c.site, c.site)}"
    meta = {"model_name": c.model, "hook_name": hook_name, "hook_layer": c.layer, "hook_head_index": None,
            "context_size": c.ctx_len, "prepend_bos": True}
    cfg = {**kind_cfg, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           # legacy (SAELens < 6) keys at the top level, the same values under "metadata" for SAELens 6
           **meta, "metadata": meta}
    with _atomic_dir(out_dir) as tmp:
        save_file(_cpu(tensors), str(tmp / SAELENS_WEIGHTS))
        _write_json(tmp / CFG, cfg)
    return Path(out_dir)


def save_sparsify(sae: SparseAutoencoder, out_dir: str | Path) -> Path:
    c = sae.cfg
    kind_cfg = sae.to_sparsify()
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    # sparsify's loader drops the fields it does not know, so model/layer/site ride along for our loader
    cfg = {**kind_cfg, "expansion_factor": max(c.n_latents // c.d_in, 1), "normalize_decoder": True,
           "num_latents": c.n_latents, "skip_connection": False, "transcode": False, "d_in": c.d_in,
           "model": c.model, "layer": c.layer, "site": c.site, "ctx_len": c.ctx_len}
    with _atomic_dir(out_dir) as tmp:
        save_file(_cpu(tensors), str(tmp / SPARSIFY_WEIGHTS))
        _write_json(tmp / CFG, cfg)
    return Path(out_dir)


SAVERS = {"native": save_native, "saelens": save_saelens, "sparsify": save_sparsify}


# ---------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({str(e)[:120]}); the SAE directory is damaged") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} must hold a JSON object")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, and OSError, and more
        first = first_line(e)
        raise InputError(f"{path} is corrupt or truncated ({first}); re-save or re-download it") from None


def detect(path: str | Path) -> tuple[str, Path]:
    """(format, directory holding the files). A folder with exactly one SAE subfolder (sparsify's
    hookpoint layout) resolves to that subfolder."""
    p = Path(path)
    if p.is_file() and p.name in (CFG, NATIVE_WEIGHTS, SAELENS_WEIGHTS):
        p = p.parent
    if not p.is_dir():
        raise InputError(f"SAE directory {str(path)!r} not found; "
                         "give a folder holding cfg.json and a .safetensors file")
    if (p / CFG).is_file():
        if (p / SAELENS_WEIGHTS).is_file():
            return "saelens", p
        if (p / NATIVE_WEIGHTS).is_file():
            return ("native" if _read_json(p / CFG).get("format") == "interp" else "sparsify"), p
    subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / CFG).is_file())
    if len(subs) == 1:
        return detect(subs[0])
    if len(subs) > 1:
        raise InputError(f"{p} holds several SAEs ({', '.join(d.name for d in subs)}); give one of those folders")
    if (p / "checkpoint").is_dir():
        raise InputError(f"{p} holds only a training checkpoint: the run has not finished; "
                         "finish it with `interp sae train ... --resume`")
    raise InputError(f"{p} is not an SAE directory: expected cfg.json with sae.safetensors (native, sparsify) "
                     "or sae_weights.safetensors (SAELens)")


def _need(state: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise InputError(f"{where} lacks tensors {', '.join(missing)}; it is not a complete SAE file")


def _load_native(d: Path) -> SparseAutoencoder:
    raw = _read_json(d / CFG)
    try:
        cfg = SAEConfig.from_dict(raw)
    except TypeError:
        raise InputError(f"{d / CFG} lacks d_in or n_latents; the SAE directory is damaged") from None
    return load_state(cfg, _read_tensors(d / NATIVE_WEIGHTS), d / NATIVE_WEIGHTS)


def _saelens_where(raw: dict) -> tuple[str, int, str]:
    """(model, layer, site) from a TransformerLens hook name. resid_pre of block L is our resid of L-1; a hook
    with no counterpart keeps its own name as the site, so eval/harvest say so and ask for --site."""
    meta = {**raw, **(raw.get("metadata") or {})}
    hook = str(meta.get("hook_name") or "")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m is None:
        layer = int(meta.get("hook_layer") or 0)
        return str(meta.get("model_name") or ""), layer, hook or "resid"
    layer, name = int(m.group(1)), m.group(2)
    if name == "hook_resid_pre":
        layer, site = layer - 1, "resid"
    else:
        site = _SITE_OF_HOOK.get(name, name)
    return str(meta.get("model_name") or ""), layer, site


def _saelens_weights(raw: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared four in our layout, with SAELens' variants folded in."""
    W_enc = state["W_enc"].float().T.contiguous()
    b_enc, b_dec, W_dec = state["b_enc"].float(), state["b_dec"].float(), state["W_dec"].float()
    if "scaling_factor" in state:  # finetuning scaling multiplies the latents before decoding
        W_dec = W_dec * state["scaling_factor"].float()[:, None]
    if not raw.get("apply_b_dec_to_input", True):
        # we always encode x - b_dec; fold it back into the encoder bias
        b_enc = b_enc + W_enc @ b_dec
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def _load_saelens(d: Path) -> SparseAutoencoder:
    raw = _read_json(d / CFG)
    wfile = d / SAELENS_WEIGHTS
    state = _read_tensors(wfile)
    _need(state, _SAELENS_SHARED, wfile)
    d_in, n = config_int(raw, "d_in", d / CFG), config_int(raw, "d_sae", d / CFG)
    if str(raw.get("normalize_activations") or "none") != "none":
        raise InputError(f"{d / CFG}: normalize_activations={raw['normalize_activations']!r} is not supported; "
                         "only SAEs trained on raw activations ('none') load")
    architecture, fn = str(raw.get("architecture") or "standard"), str(raw.get("activation_fn_str") or "relu")
    kind = saelens_kind(architecture, fn)
    if kind is None:
        raise InputError(f"{d / CFG}: SAELens architecture {architecture!r} with activation {fn!r} is not supported; "
                         "supported: standard (relu), topk, jumprelu")
    model, layer, site = _saelens_where(raw)
    common = {"d_in": d_in, "n_latents": n, "model": model, "layer": layer, "site": site,
              "ctx_len": int((raw.get("metadata") or raw).get("context_size") or 128)}
    extra = {k: v for k, v in state.items() if k not in _SAELENS_SHARED}
    return kind.from_saelens(Stored(raw, _saelens_weights(raw, state), extra, common, d / CFG, wfile))


def _load_sparsify(d: Path) -> SparseAutoencoder:
    raw = _read_json(d / CFG)
    wfile = d / SPARSIFY_WEIGHTS
    kind = sparsify_kind(str(raw.get("activation", "topk")))
    if kind is None or raw.get("transcode") or raw.get("skip_connection"):
        raise InputError(f"{d / CFG}: only plain TopK sparse autoencoders load from sparsify "
                         "(not groupmax, transcoders or skip connections)")
    d_in = config_int(raw, "d_in", d / CFG)
    n = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor") or 32)
    state = _read_tensors(wfile)
    _need(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wfile)
    # the hookpoint folder name (layers.3, layers.3.mlp) says where the SAE reads when the cfg does not
    m = re.fullmatch(r"(?:.*\.)?(?:layers|layer|h|blocks)\.(\d+)(?:\.(\w+))?", d.name)
    site_guess = _SPARSIFY_SITES.get(m.group(2) or "", "resid") if m else "resid"
    common = {"d_in": d_in, "n_latents": n, "model": str(raw.get("model") or ""),
              "layer": int(raw.get("layer", int(m.group(1)) if m else 0)), "site": str(raw.get("site") or site_guess),
              "ctx_len": int(raw.get("ctx_len") or 128)}
    ours = {"W_enc": state["encoder.weight"].float(), "b_enc": state["encoder.bias"].float(),
            "W_dec": state["W_dec"].float(), "b_dec": state["b_dec"].float()}
    return kind.from_sparsify(Stored(raw, ours, {}, common, d / CFG, wfile))


LOADERS = {"native": _load_native, "saelens": _load_saelens, "sparsify": _load_sparsify}


def read_cfg(path: str | Path) -> dict:
    """The raw cfg.json of an SAE directory of any format (native ones carry training extras such as seed)."""
    return _read_json(detect(path)[1] / CFG)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Any supported SAE directory -> our module (float32, eval mode), with .cfg saying where it reads."""
    fmt, d = detect(path)
    return LOADERS[fmt](d).to(device)


def convert(path: str | Path, to: str, out: str | Path) -> Path:
    if to not in SAVERS:
        raise InputError(f"unknown format {to!r}; valid formats: {', '.join(FORMATS)}")
    if Path(out).resolve() == Path(path).resolve():
        raise InputError(f"--out {out} is the input directory; give a different output directory")
    return SAVERS[to](load_sae(path), out)
