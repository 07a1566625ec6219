"""The `saes` table: one row per SAE in the catalog, looked up by its unique name."""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from sae.errors import InputError


@dataclass
class SAEMeta:
    """What the saes row records about an SAE."""
    model: str
    layer: int
    site: str
    d_in: int
    n_features: int
    arch: str
    k: int | None = None
    path: str | None = None
    metrics: dict = field(default_factory=dict)
    weights_sha: str | None = None


@dataclass
class SAERow:
    """An SAE as listed: its name, where it reads, its size and how much of it is labelled."""
    id: int
    name: str
    model: str
    layer: int
    site: str
    d_in: int
    n_features: int
    arch: str
    k: int | None
    metrics: dict
    harvest: dict
    created: str


def name_taken(name: str) -> InputError:
    return InputError(f"an SAE named {name!r} exists already; pass --replace to re-harvest it")


def sae_id(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT id FROM saes WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


def known_names(conn: psycopg.Connection, limit: int = 20) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM saes ORDER BY name LIMIT %s", (limit,))]


def require_sae(conn: psycopg.Connection, name: str) -> int:
    """The SAE's id, or one line naming the SAEs that exist."""
    sid = sae_id(conn, name)
    if sid is None:
        names = known_names(conn)
        raise InputError(f"no SAE named {name!r} in the catalog; known: {', '.join(names) or 'none (run interp harvest)'}")
    return sid


def lock_sae(conn: psycopg.Connection, sid: int) -> None:
    """Locks the SAE's row against deletion until the transaction ends, or one line when it is gone: what a
    foreign key to saes would check per written row, once (migration 008). Call it inside the writing
    transaction."""
    if conn.execute("SELECT 1 FROM saes WHERE id = %s FOR KEY SHARE", (sid,)).fetchone() is None:
        raise InputError(f"no SAE with id {sid} in the catalog (deleted meanwhile?); its labels were not stored")


def n_features(conn: psycopg.Connection, sid: int) -> int:
    return conn.execute("SELECT n_features FROM saes WHERE id = %s", (sid,)).fetchone()[0]


def list_saes(conn: psycopg.Connection) -> list[SAERow]:
    rows = conn.execute("SELECT id, name, model, layer, site, d_in, n_features, arch, k, metrics, harvest,"
                        " created::text FROM saes ORDER BY name").fetchall()
    return [SAERow(*r) for r in rows]


def densest_features(conn: psycopg.Connection, name: str, limit: int) -> list[int]:
    """The most often firing features: they have full example sets even in a short harvest."""
    sid = require_sae(conn, name)
    return [r[0] for r in conn.execute(
        "SELECT idx FROM features WHERE sae_id = %s ORDER BY density DESC, idx LIMIT %s", (sid, limit))]


def lock_session(conn: psycopg.Connection, key: str) -> None:
    """A session-level advisory lock on `key`: held until released or the connection closes (so a crashed
    holder never leaves it held)."""
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))


@dataclass
class HarvestRecord:
    """What a harvest left on its SAE's row: enough to tell whether the same harvest is already stored."""
    id: int
    weights_sha: str | None
    harvest: dict


def harvest_record(conn: psycopg.Connection, name: str) -> HarvestRecord | None:
    row = conn.execute("SELECT id, weights_sha, harvest FROM saes WHERE name = %s", (name,)).fetchone()
    return HarvestRecord(*row) if row else None
