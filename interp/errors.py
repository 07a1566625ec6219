"""Turn known failures of the services we use into one readable line."""
from __future__ import annotations


def describe(e: BaseException) -> str | None:
    import psycopg

    if isinstance(e, psycopg.OperationalError):
        from interp.db import redact_url
        from interp.settings import get_settings
        from sae.errors import first_line

        return f"cannot reach the database at {redact_url(get_settings().database_url)}: {first_line(e)}"
    return None
