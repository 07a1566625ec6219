"""A password in DATABASE_URL never reaches any output: connection errors, the service-error line, --json."""
import psycopg
import pytest

from interp.db import redact_url
from interp.errors import describe
from interp.settings import get_settings
from tests.helpers import harvest_args

SECRET = "hunter2pw"
BAD = f"postgresql://someone:{SECRET}@127.0.0.1:1/test"


def test_redact_url_hides_only_the_password():
    assert redact_url(BAD) == "postgresql://someone:***@127.0.0.1:1/test"
    assert redact_url("postgresql://127.0.0.1:5432/test") == "postgresql://127.0.0.1:5432/test"
    assert redact_url("redis://:hunter2pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"


@pytest.mark.parametrize("args", [("db", "migrate"), ("feature", "x", "0"), ("feature", "x", "0", "--json"),
                                  "harvest"])
def test_unreachable_database_names_the_url_without_its_password(cli, args, sae_dir):
    args = harvest_args(sae_dir, "t_secret") if args == "harvest" else args
    r = cli(*args, env={"DATABASE_URL": BAD})
    assert r.returncode == 2
    assert "127.0.0.1:1" in r.stderr and "***" in r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_service_error_line_redacts(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", BAD)
    get_settings.cache_clear()
    try:
        line = describe(psycopg.OperationalError("server closed the connection unexpectedly"))
    finally:
        get_settings.cache_clear()
    assert line is not None and "server closed" in line and SECRET not in line
