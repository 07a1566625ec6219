"""Each job's config is one dataclass and its CLI: every field has its flag with the field's default, the
documented flags keep their spelling, and a bad value is one line and exit 2 before any work starts."""
import dataclasses
import inspect
import sys

import click
import pytest
import typer

from interp.cli import app, main
from sae.cli_config import flag_of
from sae.configs import HarvestConfig, TrainConfig
from sae.errors import InputError, first_line


def _command(*path: str) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _params(cmd: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in cmd.params}


DOCUMENTED = {
    ("sae", "train"): ["--model", "--layer", "--corpus", "--latents", "--k", "--tokens", "--out", "--site", "--arch",
                       "--device", "--ctx-len", "--batch-tokens", "--lr", "--seed", "--resume", "--json"],
    ("harvest",): ["--sae", "--name", "--corpus", "--tokens", "--ctx", "--ctx-len", "--top", "--shard",
                   "--state-dir", "--replace", "--device", "--batch-size", "--json"],
}


@pytest.mark.parametrize("path", list(DOCUMENTED))
def test_documented_flags_keep_their_spelling(path):
    flags = {o for p in _command(*path).params for o in p.opts}
    assert set(DOCUMENTED[path]) <= flags, set(DOCUMENTED[path]) - flags


@pytest.mark.parametrize("cls, path", [(TrainConfig, ("sae", "train")), (HarvestConfig, ("harvest",))])
def test_every_field_has_its_flag_with_the_same_default(cls, path):
    params = _params(_command(*path))
    for f in dataclasses.fields(cls):
        p = params.get(f.name)
        assert p is not None, f"{cls.__name__}.{f.name} has no flag"
        assert flag_of(cls, f.name) in p.opts, (f.name, p.opts)
        assert p.help == f.metadata["help"] and p.help, f.name
        if f.default is dataclasses.MISSING or f.metadata["cli_required"]:
            assert p.required, f.name
        else:
            assert not p.required and p.default == f.default, (f.name, p.default, f.default)


def test_train_size_and_destination_stay_required_and_the_batch_help_matches_the_code():
    params = _params(_command("sae", "train"))
    assert [n for n, p in params.items() if p.required] == ["model", "layer", "latents", "tokens", "out"]
    assert "tokens/400" in params["batch_tokens"].help
    # 1M tokens / 400 = 2500, whose nearest power of two is 2048
    assert TrainConfig(model="m", layer=0, tokens=1_000_000).batch_tokens == 2048
    assert TrainConfig(model="m", layer=0, tokens=10_000).batch_tokens == 512


def test_window_is_read_from_ctx_and_top_k_from_top():
    params = _params(_command("harvest"))
    assert params["window"].opts == ["--ctx"] and params["top_k"].opts == ["--top"]
    assert params["ctx_len"].opts == ["--ctx-len"]


def test_configs_are_frozen_and_defaults_are_not_shared_instances():
    from interp import scorers
    from sae import harvest

    cfg = TrainConfig(model="m", layer=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        HarvestConfig().window = 3
    for fn in (harvest.harvest, harvest.HarvestState.__init__, scorers.simulation, scorers.classify,
               scorers.embedding, scorers.run_scorers):
        assert inspect.signature(fn).parameters["cfg"].default is None, fn.__name__


@pytest.mark.parametrize("kw, message", [
    (dict(window=1), "--ctx and --top must be at least 2, got --ctx 1 --top 50"),
    (dict(top_k=1), "--ctx and --top must be at least 2, got --ctx 32 --top 1"),
    (dict(window=40, ctx_len=32), "--ctx 40 is longer than the harvest contexts (--ctx-len 32)"),
    (dict(n_bins=0), "--n-bins must be a positive integer, got 0"),
])
def test_bad_harvest_config_is_one_input_error(kw, message):
    with pytest.raises(InputError) as e:
        HarvestConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, message", [
    (dict(k=64, latents=64), "--k (64) must be smaller than --latents (64)"),
    (dict(tokens=100, batch_tokens=512), "--tokens (100) must be at least --batch-tokens (512)"),
    (dict(buffer_tokens=0), "--buffer-tokens must be a positive integer, got 0"),
    (dict(arch="nope"), "unknown --arch 'nope'"),
])
def test_bad_train_config_is_one_input_error(kw, message):
    with pytest.raises(InputError) as e:
        TrainConfig(model="m", layer=0, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["harvest", "--sae", "nowhere", "--name", "x", "--tokens", "512", "--ctx", "1"],
     "error: --ctx and --top must be at least 2, got --ctx 1 --top 50"),
    (["harvest", "--sae", "nowhere", "--name", "x", "--tokens", "512", "--ctx", "40", "--ctx-len", "32"],
     "error: --ctx 40 is longer than the harvest contexts (--ctx-len 32); give --ctx <= --ctx-len"),
    (["harvest", "--sae", "nowhere", "--name", "x", "--tokens", "512", "--checkpoint-every", "-5"],
     "error: --checkpoint-every takes seconds >= 0 (0: no checkpoints), got -5.0"),
    (["sae", "train", "--model", "minilm", "--layer", "1", "--latents", "64", "--k", "64", "--tokens", "1024",
      "--out", "OUT"], "error: --k (64) must be smaller than --latents (64)"),
])
def test_bad_flag_value_through_the_cli_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    # the config is built before the SAE, the database or the model is touched: none of them exists here
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/none")
    monkeypatch.setattr(sys, "argv", ["interp", *[str(tmp_path / a) if a == "OUT" else a for a in args]])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "OUT").exists()


def test_first_line_of_an_exception():
    assert first_line(RuntimeError("  top line\nmore detail\n")) == "top line"
    assert first_line(KeyError()) == "KeyError"
