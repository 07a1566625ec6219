"""`interp sae train` end to end on MiniLM: bad input, resume, the saved SAE on raw activations."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from interp.cli import main
from sae.formats import load_sae
from sae.models import hooked
from sae.train import ActivationStream, TrainConfig, geometric_median, lr_at, train


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(v for _, v in sorted(topics.topics.items())[:60]))
    return str(path)


# ---------------------------------------------------------------- pure parts
def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0, warmup=10, decay_frac=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_geometric_median_ignores_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1 + torch.tensor([1.0, 2.0, 3.0]), torch.full((20, 3), 1000.0)])
    med = geometric_median(x)
    assert torch.allclose(med, torch.tensor([1.0, 2.0, 3.0]), atol=0.1)
    assert (x.mean(0) - torch.tensor([1.0, 2.0, 3.0])).norm() > 50  # the mean would not do


# ---------------------------------------------------------------- bad input
BASE = ["sae", "train", "--model", "minilm", "--layer", "1", "--latents", "64", "--k", "4", "--tokens", "1024",
        "--batch-tokens", "256"]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def bad_cases(corpus_file, empty_file):
    return {
        "k >= latents": (_set(BASE, "--k", "64"), "--k (64) must be smaller than --latents (64)"),
        "zero latents": (_set(BASE, "--latents", "0"), "--latents must be a positive integer"),
        "negative tokens": (_set(BASE, "--tokens", "-5"), "--tokens must be a positive integer"),
        "negative lr": (_set(BASE, "--lr", "-0.1"), "--lr must be positive"),
        "layer out of range": (_set(BASE, "--layer", "99"), "valid layers: 0..5"),
        "unknown site": (_set(BASE, "--site", "foo"), "valid sites: resid, mlp, attn"),
        "unknown model": (_set(BASE, "--model", "no-such-model-anywhere"), "cannot load model"),
        "missing corpus": (_set(BASE, "--corpus", "/nonexistent/corpus.txt"), "not found"),
        "empty corpus": (_set(BASE, "--corpus", empty_file), "is empty"),
        "resume without checkpoint": (_set(BASE, "--corpus", corpus_file) + ["--resume"], "no checkpoint"),
    }


def test_bad_input_gives_one_line_exit_2_and_no_out_dir(tmp_path, corpus, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for name, (args, expect) in bad_cases(corpus, str(empty)).items():
        out = tmp_path / name.replace(" ", "_")
        monkeypatch.setattr(sys, "argv", ["interp", *args, "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2, name
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], (name, err)
        assert not out.exists(), name


def test_bad_input_through_the_real_command(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "interp.cli", *_set(BASE, "--k", "100"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --k (100) must be smaller than --latents (64)"
    assert not out.exists()


# ---------------------------------------------------------------- runs
def _cfg(corpus, out, **kw):
    base = dict(model="minilm", layer=1, corpus=corpus, latents=128, k=4, tokens=256 * 6, batch_tokens=256,
                buffer_tokens=1024, checkpoint_every=2, warmup_steps=2, lr=3e-3, out=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def test_resume_continues_to_the_same_weights_and_the_sae_works_on_raw_activations(tmp_path, corpus):
    cfg = _cfg(corpus, tmp_path / "whole")
    whole = train(cfg)
    part = train(_cfg(corpus, tmp_path / "parts", max_steps=3))
    assert not part["finished"] and part["steps"] == 3 and part["tokens"] == 3 * 256
    assert not (tmp_path / "parts" / "cfg.json").exists()   # an interrupted run does not look like an SAE
    rest = train(_cfg(corpus, tmp_path / "parts", resume=True))
    assert rest["finished"] and rest["steps"] == whole["steps"] == 6 and rest["tokens"] == whole["tokens"]
    a = load_file(str(tmp_path / "whole" / "sae.safetensors"))
    b = load_file(str(tmp_path / "parts" / "sae.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name

    sae = load_sae(tmp_path / "whole")
    assert sae.cfg.model == "minilm" and sae.cfg.layer == 1
    assert whole["scale"] != pytest.approx(1.0, abs=0.05)  # the folding below is really exercised
    x = ActivationStream(hooked("minilm", 1, "resid", device="cpu"), cfg).next_batch()  # raw, unscaled
    with torch.no_grad():
        fvu = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    # folded weights on raw activations do at least as well as training did (its mean over the last steps)
    assert fvu < min(whole["fvu"] + 0.02, 0.95)
