"""Bad SAE directories and outputs: one clear InputError, and never a half-written directory that looks complete."""
from __future__ import annotations

import json

import pytest
import torch

import sae.formats as formats
from sae.archs import SAEConfig, build
from sae.errors import InputError
from sae.formats import convert, load_sae, save_native, save_sparsify


def _sae(arch="topk"):
    torch.manual_seed(0)
    return build(SAEConfig(d_in=16, n_latents=64, arch=arch, k=4))


def test_truncated_safetensors(tmp_path):
    save_native(_sae(), tmp_path / "s")
    f = tmp_path / "s" / "sae.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(InputError, match=r"sae\.safetensors is corrupt or truncated"):
        load_sae(tmp_path / "s")


def test_garbage_safetensors(tmp_path):
    save_sparsify(_sae(), tmp_path / "s")
    (tmp_path / "s" / "sae.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_sae(tmp_path / "s")


def test_broken_cfg_json(tmp_path):
    save_native(_sae(), tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="cfg.json is not readable JSON"):
        load_sae(tmp_path / "s")


def test_weights_that_do_not_match_cfg(tmp_path):
    save_native(_sae(), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "n_latents": 32}))
    with pytest.raises(InputError, match="weights do not match its cfg.json"):
        load_sae(tmp_path / "s")


def test_missing_and_unrecognised_dirs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is not an SAE directory"):
        load_sae(tmp_path / "empty")


def test_several_hookpoints_need_a_choice(tmp_path):
    save_sparsify(_sae(), tmp_path / "run" / "layers.1")
    save_sparsify(_sae(), tmp_path / "run" / "layers.2")
    with pytest.raises(InputError, match=r"holds several SAEs \(layers\.1, layers\.2\)"):
        load_sae(tmp_path / "run")


def test_unknown_format(tmp_path):
    save_native(_sae(), tmp_path / "s")
    with pytest.raises(InputError, match="unknown format 'onnx'; valid formats: native, saelens, sparsify"):
        convert(tmp_path / "s", "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sparsify_refuses_non_topk(tmp_path):
    save_native(_sae("jumprelu"), tmp_path / "s")
    with pytest.raises(InputError, match="sparsify format holds TopK SAEs only"):
        convert(tmp_path / "s", "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_onto_itself(tmp_path):
    save_native(_sae(), tmp_path / "s")
    with pytest.raises(InputError, match="is the input directory"):
        convert(tmp_path / "s", "saelens", tmp_path / "s")


def test_crash_mid_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", boom)
    with pytest.raises(OSError):
        save_native(_sae(), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_other_files_and_never_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_native(_sae(), out)
    (out / "checkpoint.pt").write_bytes(b"x")
    real = formats.os.replace
    seen = []

    def spy(src, dst):
        seen.append((str(dst).rsplit("/", 1)[-1], (out / "cfg.json").exists()))
        real(src, dst)

    monkeypatch.setattr(formats.os, "replace", spy)
    save_native(_sae(), out, extra={"step": 2})
    # the weights are swapped while no cfg.json is there; cfg.json comes last
    assert seen == [("sae.safetensors", False), ("cfg.json", False)]
    assert (out / "checkpoint.pt").exists() and json.loads((out / "cfg.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unfinished_training_run(tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "state.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="holds only a training checkpoint: the run has not finished"):
        load_sae(tmp_path / "run")


def test_converting_over_another_format_leaves_no_stale_weights(tmp_path):
    formats.save_saelens(_sae(), tmp_path / "s")
    convert(tmp_path / "s", "native", tmp_path / "s2")
    formats.save_saelens(_sae("relu"), tmp_path / "out")
    convert(tmp_path / "s2", "native", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert load_sae(tmp_path / "out").cfg.arch == "topk"


def test_native_cfg_without_sizes(tmp_path):
    save_native(_sae(), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["n_latents"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="lacks d_in or n_latents"):
        load_sae(tmp_path / "s")
