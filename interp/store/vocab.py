"""Tokenizer vocabularies, stored once per tokenizer and shared by every SAE on that model."""
from __future__ import annotations

import hashlib

import psycopg


def vocab_key(model: str, tokens: list[str]) -> str:
    digest = hashlib.sha1("\x1f".join(tokens).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{model}:{digest}"


def store_vocab(conn: psycopg.Connection, key: str, tokens: list[str]) -> None:
    """Idempotent: a vocabulary already stored under its key is left as it is."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM vocab WHERE tokenizer = %s LIMIT 1", (key,)).fetchone():
            return
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("vocab:" + key,))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS stage_vocab (token_id int, token text) ON COMMIT DROP")
        with conn.cursor().copy("COPY stage_vocab FROM STDIN") as cp:
            for i, t in enumerate(tokens):
                cp.write_row((i, t))
        conn.execute("INSERT INTO vocab SELECT %s, token_id, token FROM stage_vocab ON CONFLICT DO NOTHING", (key,))


def decode_ids(conn: psycopg.Connection, key: str | None, ids: set[int]) -> dict[int, str]:
    if not key or not ids:
        return {}
    rows = conn.execute("SELECT token_id, token FROM vocab WHERE tokenizer = %s AND token_id = ANY(%s)",
                        (key, sorted(ids)))
    return dict(rows.fetchall())
