"""Bulk loading of a catalog without a harvest: an SAE row, feature statistics and scored labels by COPY.
Used by the catalog benchmark (millions of synthetic labels) and by tests that need features to label.

COPY has no ON CONFLICT, so labels go through a session-temporary staging table and one INSERT ... SELECT,
which also writes their scores by joining back on the explanation's unique key.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from interp.db import analyze_partitions

from .saes import SAEMeta, lock_sae, name_taken

HIST_BINS = 50


@dataclass
class FeatureStats:
    idx: int
    density: float
    max_act: float
    mean_act: float
    n_fired: int = 0


@dataclass
class ScoredLabel:
    feature: int
    label: str
    explainer: str = "bench"
    prompt_version: str = "v1"
    is_baseline: bool = False
    scores: dict[str, float] = field(default_factory=dict)   # scorer -> value
    simulator: str = "bench"
    method: str = "json"


def create_sae(conn: psycopg.Connection, name: str, meta: SAEMeta) -> int:
    """A new SAE row; one line if the name is taken."""
    if conn.execute("SELECT 1 FROM saes WHERE name = %s", (name,)).fetchone():
        raise name_taken(name)
    return conn.execute(
        "INSERT INTO saes (name, model, layer, site, d_in, n_features, arch, k, metrics, path)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (name, meta.model, meta.layer, meta.site, meta.d_in, meta.n_features, meta.arch, meta.k,
         Jsonb(meta.metrics), meta.path)).fetchone()[0]


def copy_features(conn: psycopg.Connection, sid: int, rows: Iterable[FeatureStats]) -> int:
    """Feature statistics with an empty histogram; returns the rows written."""
    n = 0
    # COPY text lines built here: per-value adaptation (an array of 50 ints a row) would cost more than the COPY
    tail = "\t{" + ",".join(["0"] * HIST_BINS) + "}\t"
    with conn.transaction(), conn.cursor().copy(
            "COPY features (sae_id, idx, density, n_fired, max_act, mean_act, hist, hist_max) FROM STDIN") as cp:
        for chunk in _chunks(rows):
            cp.write("".join(f"{sid}\t{f.idx}\t{f.density!r}\t{f.n_fired}\t{f.max_act!r}\t{f.mean_act!r}{tail}"
                             f"{f.max_act!r}\n" for f in chunk))
            n += len(chunk)
    # planner statistics now, not at autovacuum's next visit (never, where it is off): a search joining a
    # partition it believes empty scans it for every hit
    analyze_partitions(conn, sid, ("features",))
    return n


def _chunks(rows: Iterable, size: int = 10_000):
    chunk = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(s: str) -> str:
    """A value in COPY's text format."""
    return s.translate(_ESCAPE)


def _array(items) -> str:
    """A Postgres array literal of text items, each quoted (then escaped for COPY by the caller)."""
    return "{" + ",".join('"' + str(x).replace("\\", "\\\\").replace('"', '\\"') + '"' for x in items) + "}"


# The staging row's id is drawn from the explanations sequence as COPY writes it, so the scores join back to the
# inserted labels on one bigint (a hash join) rather than on (feature, explainer, prompt_version) text columns,
# and a key given twice in one load writes its scores once, from the row that was inserted. nextval is atomic,
# so concurrent writers never get the same id; ids of rows that conflict are simply skipped.
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS stage_scored_labels (id bigint DEFAULT nextval('explanations_id_seq'),"
          " feature int, label text, explainer text, prompt_version text, is_baseline boolean, scorers text[],"
          " simulator text, vals real[], method text)")
_COPY_STAGE = ("COPY stage_scored_labels (feature, label, explainer, prompt_version, is_baseline, scorers, simulator,"
               " vals, method) FROM STDIN")
_INSERT = (
    "WITH ins AS (INSERT INTO explanations (id, sae_id, feature, explainer, prompt_version, label, is_baseline)"
    " SELECT id, %s, feature, explainer, prompt_version, label, is_baseline FROM stage_scored_labels"
    " ON CONFLICT DO NOTHING RETURNING id)"
    " INSERT INTO scores (explanation_id, scorer, simulator, value, method)"
    " SELECT s.id, u.scorer, s.simulator, u.value, s.method FROM ins JOIN stage_scored_labels s USING (id),"
    " unnest(s.scorers, s.vals) AS u(scorer, value)")
LABEL_CHUNK = 50_000    # labels per COPY + INSERT round: large enough to amortise each statement, small enough
#                         that the next chunk's text is built while the server inserts this one


class _Encoder:
    """COPY text lines of ScoredLabels. Explainer, prompt version, simulator, method and the scorer names repeat
    across millions of rows, so each distinct one is escaped once; only the label is escaped per row. It also
    gathers the labels' distinct whitespace-separated tokens (see `copy_labels`)."""

    def __init__(self):
        self.cache: dict = {}
        self.tokens: set[str] = set()

    def esc(self, value) -> str:
        out = self.cache.get(value)
        if out is None:
            out = self.cache[value] = _text(_array(value) if isinstance(value, tuple) else value)
        return out

    def lines(self, rows: list[ScoredLabel]) -> str:
        e, tokens = self.esc, self.tokens
        for r in rows:
            tokens.update(r.label.split())
        return "".join(
            f"{r.feature}\t{_text(r.label)}\t{e(r.explainer)}\t{e(r.prompt_version)}\t{'t' if r.is_baseline else 'f'}"
            f"\t{e(tuple(r.scores))}\t{e(r.simulator)}\t{{{','.join(map(repr, map(float, r.scores.values())))}}}"
            f"\t{e(r.method)}\n" for r in rows)


def copy_labels(conn: psycopg.Connection, sid: int, rows: Iterable[ScoredLabel]) -> int:
    """Labels and their scores, in one transaction; a label already stored under its unique key is kept as it
    is (so are its scores). Returns the labels read.

    Two cores' worth of work: this thread turns rows into COPY text (Python, holding the GIL) while a second
    thread sends the previous chunk and runs its INSERT (psycopg waits on the socket without the GIL, and the
    server does the inserting), so the load takes about the longer of the two, not their sum.

    The labels' words go into label_words once, at the end, from their distinct whitespace-separated tokens
    (which the server splits further as it splits every label): the insert trigger would split every label's
    text on the server, which is busy, while this thread has time to spare."""
    enc = _Encoder()
    writer = _Writer(conn, sid, enc.tokens)
    writer.start()
    n = 0
    try:
        for chunk in _chunks(rows, LABEL_CHUNK):
            if writer.failure:
                break
            writer.chunks.put(enc.lines(chunk))
            n += len(chunk)
    except BaseException:
        writer.chunks.put(_ABORT)      # the rows failed: roll back what was inserted
        raise
    finally:
        writer.chunks.put(None)
        writer.join()
    if writer.failure:
        raise writer.failure[0]
    return n


_ABORT = object()


class _Abort(Exception):
    pass


class _Writer(threading.Thread):
    """COPYs each chunk of text into the staging table and inserts it, all in one transaction. On a failure it
    keeps taking chunks (and drops them) until the end, so the producer never blocks on a full queue."""

    def __init__(self, conn: psycopg.Connection, sid: int, tokens: set[str]):
        super().__init__(name="copy-labels", daemon=True)
        self.conn, self.sid = conn, sid
        self.tokens = tokens        # complete once the producer has sent the end of the chunks
        self.chunks: queue.Queue = queue.Queue(maxsize=2)
        self.failure: list[BaseException] = []
        self.ended = False

    def next_chunk(self):
        item = self.chunks.get()
        if item is _ABORT:
            raise _Abort
        self.ended = item is None
        return item

    def run(self) -> None:
        try:
            self.write()
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self.failure.append(e)
        while not self.ended:
            self.ended = self.chunks.get() is None

    def write(self) -> None:
        conn = self.conn
        with conn.transaction():
            lock_sae(conn, self.sid)
            conn.execute(_STAGE)
            # The staging table has no statistics, so the planner guesses millions of joined rows and JIT-compiles
            # every chunk's INSERT: half a second a chunk of compiling for a plan that runs in a few seconds.
            # And the join of a chunk's inserted ids to its staging rows stays in memory.
            conn.execute("SELECT set_config('jit', 'off', true), set_config('work_mem', '128MB', true),"
                         " set_config('interp.defer_label_words', 'on', true)")
            key = _drop_scores_key_if_empty(conn)
            while (text := self.next_chunk()) is not None:
                conn.execute("TRUNCATE stage_scored_labels")
                with conn.cursor().copy(_COPY_STAGE) as cp:
                    cp.write(text)
                conn.execute(_INSERT, (self.sid,))
            conn.execute("TRUNCATE stage_scored_labels")
            conn.execute("SELECT add_label_words(%s)", (sorted(self.tokens),))
            if key is not None:
                conn.execute(sql.SQL("ALTER TABLE scores ADD CONSTRAINT {} {}").format(
                    sql.Identifier(key[0]), sql.SQL(key[1])))


def _drop_scores_key_if_empty(conn: psycopg.Connection) -> tuple[str, str] | None:
    """Into an empty catalog, the load drops the scores' foreign key to explanations, and adds it back at its end
    in the same transaction: one join then checks every score, where the key would look each one up as it is
    inserted (a third of the load's server time). Returns the key's name and definition (as the catalog spells
    it), or None when explanations holds anything: the check reads the whole table, and the exclusive lock on
    both tables, held to the end of the load, would stop every search and label write meanwhile. An empty
    catalog has nothing to search, and a label writer waits for the load to commit."""
    if conn.execute("SELECT EXISTS (SELECT 1 FROM explanations)").fetchone()[0]:
        return None
    conn.execute("LOCK TABLE explanations, scores IN ACCESS EXCLUSIVE MODE")
    key = conn.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f'"
                       " AND conrelid = 'scores'::regclass AND confrelid = 'explanations'::regclass").fetchone()
    # a writer may have got in before the lock; then the table is in use, and the key stays
    if key is None or conn.execute("SELECT EXISTS (SELECT 1 FROM explanations)").fetchone()[0]:
        return None
    conn.execute(sql.SQL("ALTER TABLE scores DROP CONSTRAINT {}").format(sql.Identifier(key[0])))
    return key[0], key[1]


# The label search index on explanations (as migration 004 creates it). A bulk load drops it and builds it after:
# one sorted build is several times faster than maintaining a GIN index row by row.
SEARCH_INDEXES = {
    "explanations_label_tsv": "CREATE INDEX IF NOT EXISTS explanations_label_tsv ON explanations USING gin (label_tsv)",
}


def drop_search_indexes(conn: psycopg.Connection) -> None:
    for name in SEARCH_INDEXES:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(name)))


def create_search_indexes(conn: psycopg.Connection, maintenance_work_mem: str = "1GB") -> None:
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
    for ddl in SEARCH_INDEXES.values():
        conn.execute(ddl)
    conn.execute("ANALYZE explanations")


def vacuum_labels(conn: psycopg.Connection) -> None:
    """VACUUM (ANALYZE) the label tables after a bulk write, as autovacuum would do later (and never does where
    it is off). Embedding labels in bulk rewrites every explanation row (its `embedded` flag), which leaves a
    dead tuple per label and the full-text GIN index with a full pending list and an entry for every dead tuple:
    until a vacuum, every full-text and trigram search scans the pending list and walks twice the posting
    entries.
    The connection must be in autocommit mode (VACUUM cannot run in a transaction)."""
    for table in ("explanations", "scores", "label_embeddings", "label_words"):
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
