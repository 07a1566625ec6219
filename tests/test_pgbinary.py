"""The column-wise binary COPY encoder against the real Postgres: what it writes reads back as the values,
NULLs included, whichever way the rows are cut into chunks."""
import os

import numpy as np
import pytest

from interp import pgbinary
from interp.db import connect
from interp.pgbinary import Col

URL = os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")


def _cols(rng, n):
    arr_len = rng.integers(-1, 6, n)            # -1: NULL
    by_len = rng.integers(-1, 40, n)
    ints = rng.integers(-2**31, 2**31, n)
    flat_f = rng.standard_normal(int(np.clip(arr_len, 0, None).sum())).astype(np.float32)
    flat_b = rng.integers(0, 256, int(np.clip(by_len, 0, None).sum()), dtype=np.uint8)
    cols = [Col(">i4", ints), Col(">i2", rng.integers(-99, 99, n)), Col(">i8", ints * 3),
            Col(">f4", rng.standard_normal(n)), Col(">f4", flat_f, arr_len), Col("bytes", flat_b, by_len)]
    return cols, arr_len, by_len, flat_f, flat_b


def _reference_join(parts, lengths, n_rows):
    lens = np.stack([np.broadcast_to(np.asarray(x, np.int64), (n_rows,)) for x in lengths], 1)
    offs = np.concatenate([np.zeros((1, len(parts)), np.int64), np.cumsum(lens, 0)[:-1]], 0)
    out = b"".join(bytes(np.ascontiguousarray(parts[p], np.uint8).ravel()[offs[r, p]:offs[r, p] + lens[r, p]])
                   for r in range(n_rows) for p in range(len(parts)))
    return np.frombuffer(out, np.uint8), lens.sum(1)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 23])
@pytest.mark.parametrize("unit", [1, 2, 4, 8])
def test_join_matches_a_plain_byte_join_at_any_chunk_size(chunk, unit):
    """`unit`: every segment a multiple of it, so the join moves 1, 2, 4 or 8 bytes at a time."""
    rng = np.random.default_rng(chunk)
    n = 50
    lengths = [rng.integers(0, 9, n) * unit, np.full(n, 4 * unit), rng.integers(0, 30, n) * unit]
    parts = [rng.integers(0, 256, int(np.sum(x)), dtype=np.uint8) for x in lengths]
    got, per_row = pgbinary._join(parts, lengths, n, chunk=chunk)
    want, want_rows = _reference_join(parts, lengths, n)
    assert got.tobytes() == want.tobytes()
    assert per_row.tolist() == want_rows.tolist()


def test_rows_read_back_from_postgres():
    rng = np.random.default_rng(0)
    n = 300
    cols, arr_len, by_len, flat_f, flat_b = _cols(rng, n)
    with connect(URL) as conn:
        conn.execute("CREATE TEMP TABLE pgb (a int, b smallint, c bigint, d real, e real[], f bytea)")
        with conn.cursor().copy("COPY pgb FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(pgbinary.HEADER + pgbinary.rows(cols, n) + pgbinary.TRAILER)
        got = conn.execute("SELECT a, b, c, d, e, f FROM pgb").fetchall()
    assert len(got) == n
    fo = np.concatenate([[0], np.cumsum(np.clip(arr_len, 0, None))])
    bo = np.concatenate([[0], np.cumsum(np.clip(by_len, 0, None))])
    for r, (a, b, c, d, e, f) in enumerate(got):
        assert (a, b, c) == (int(cols[0].values[r]), int(cols[1].values[r]), int(cols[2].values[r]))
        assert d == pytest.approx(float(np.float32(cols[3].values[r])))
        assert e == (None if arr_len[r] < 0 else pytest.approx(flat_f[fo[r]:fo[r + 1]].tolist()))
        assert f == (None if by_len[r] < 0 else bytes(flat_b[bo[r]:bo[r + 1]]))
