"""Turn known failures of the services we use into one readable line."""
from __future__ import annotations


def describe(e: BaseException) -> str | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        psycopg = None
    if psycopg is not None and isinstance(e, psycopg.OperationalError):
        from interp.settings import get_settings

        return f"cannot reach the database at {get_settings().database_url}: {str(e).strip().splitlines()[0]}"
    return None
