"""Fixtures shared by the tests that use the real Postgres catalog: a migrated connection, unique SAE names
that are deleted afterwards, a tiny MiniLM SAE, and the CLI run in-process."""
import subprocess
import sys
import uuid

import pytest
import torch

from interp.db import connect, migrate
from sae.archs import SAEConfig, build
from sae.formats import save_native
from tests.helpers import ENV, URL


@pytest.fixture(scope="module")
def conn():
    c = connect(URL)
    migrate(c)
    yield c
    c.close()


@pytest.fixture
def fresh_db():
    """The URL of a new, empty database, dropped afterwards."""
    name = f"t_mig_{uuid.uuid4().hex[:8]}"
    admin = connect(URL)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def names(conn):
    made = []

    def new():
        made.append(f"t_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield new
    conn.execute("DELETE FROM saes WHERE name = ANY(%s)", (made,))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=384, n_latents=128, k=6, model="minilm", layer=1, site="resid"))
    return str(save_native(sae, tmp_path_factory.mktemp("sae") / "minilm-l1"))


@pytest.fixture
def cli(capsys, monkeypatch):
    """Runs `interp ARGS` in this process through the CLI's own main(): (exit code, stdout, stderr)."""
    from interp.cli import main
    from interp.settings import get_settings

    def run(*args, env=None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        monkeypatch.setattr(sys, "argv", ["interp", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
        finally:
            for k in env or {}:
                monkeypatch.setenv(k, ENV[k])
            get_settings.cache_clear()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run
