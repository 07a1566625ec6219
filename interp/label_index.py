"""The semantic arm's nearest-neighbour index: usearch files beside the catalog, derived from the label
embeddings that Postgres keeps (the source of truth), so it can be deleted and rebuilt at any time.

HNSW's walk cannot reach a label that is nobody's near neighbour: a label on a topic no other label shares
(one vehicle label among a million about code) keeps its own edges, but every label near the query prunes its
edge to it in favour of closer ones, so no query reaches it however wide the beam ("car" never found "automobiles
and trucks" at 1 M labels, even at expansion 4,000). Such *isolated* labels, the ones with fewer than two others
within ISOLATED_BELOW, are also kept in a small side index searched exactly, and `nearest` merges both.

The files record the catalog they were built from (search_catalog.uuid) and the last embedding seq they hold. At
each search, labels stored since then are embedded with MiniLM (a bounded number per search) and added
incrementally; a file for another catalog, or an unreadable one, is rebuilt from Postgres. Updates take a file
lock and are written to a temporary sibling and renamed, so a concurrent reader sees the old file or the new one.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import psycopg

from interp.store import search as store

EMBED_MODEL = "minilm"          # the sentence-transformers MiniLM of interp.scorers.minilm_encoder
# MiniLM cosine below which a neighbour is unrelated, so nonsense queries get no semantic hits. Measured on
# the test labels: "car" -> "automobiles and trucks" 0.65, "feline" -> "cats and kittens" 0.57, "%" -> "percent
# signs in tables" 0.39; unrelated pairs 0.0-0.31 ("bridges" -> "automobiles and trucks")
MIN_SIMILARITY = 0.35
# usearch's defaults (16, 128) build at about 1.5 k vectors/s a core here; these at about 6 k, and a search still
# asks for 200 or more neighbours, so the few lost to a thinner graph do not change what the fusion sees
HNSW = {"connectivity": 12, "expansion_add": 64}
# A label whose second-nearest other label is below this cosine is isolated (3-4% of the synthetic 1 M catalog,
# whose labels share words; at a few hundred labels, most). Two: a label stored twice is still alone.
ISOLATED_BELOW = 0.5
ISOLATION_EXPANSION = 16        # the walk that finds an added label's neighbours; a neighbour it misses only
                                # makes the label look isolated, which costs an exact comparison, never a miss
EMBED_PER_SEARCH = 2000         # labels embedded at one search; the rest wait for the next one (about 2 s of CPU)


class SemanticUnavailable(Exception):
    """The semantic arm cannot run; the message says why in one line, and search goes on with the text arms."""


def meta_path(index_dir: str, catalog: str) -> Path:
    """The file that names the current index file of a catalog and the last embedding seq it holds. Replacing
    it is the one atomic step of an update, so the pair (index, seq) is never torn by a crash."""
    return Path(index_dir).expanduser() / f"labels-{catalog}.json"


def embed(texts: list[str], encoder) -> np.ndarray:
    """Unit-norm MiniLM vectors. A query (a few texts) is embedded on one thread: torch's intra-op threads wait
    on each other, and on a busy 2-core machine that took one query from 35 ms to 500 ms."""
    import torch

    threads = torch.get_num_threads()
    if len(texts) <= 8:
        torch.set_num_threads(1)
    try:
        lean = _mean_pooled(encoder) if len(texts) <= 8 else None
        if lean is not None:
            return _embed_few(texts, *lean)
        out = encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
    finally:
        torch.set_num_threads(threads)
    return out.astype(np.float32)


def _mean_pooled(encoder):
    """(model, tokenizer, max length) when the encoder is a transformer, mean pooling and normalisation (MiniLM's
    pipeline), else None."""
    from sentence_transformers.models import Normalize, Pooling, Transformer

    mods = list(encoder)
    if (len(mods) == 3 and isinstance(mods[0], Transformer) and isinstance(mods[1], Pooling)
            and getattr(mods[1], "pooling_mode", None) == "mean" and isinstance(mods[2], Normalize)):
        return mods[0].auto_model, encoder.tokenizer, mods[0].max_seq_length
    return None


def _embed_few(texts: list[str], model, tokenizer, max_length: int) -> np.ndarray:
    """What `encode` computes for a few texts, 3-4 ms sooner (19.5 against 22.5 ms at the median on the slow 2-core
    box): for a query of a few words, encode's batching and module wrappers cost a fifth of BERT's forward."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


_LOAD_LOCK = threading.Lock()
_EXACT = ThreadPoolExecutor(max_workers=2, thread_name_prefix="isolated-labels")


def load_encoder():
    """MiniLM, loaded once per process (a load costs about a second; a query embedding a few ms). Locked: a search
    asks for it on its embedding thread and on its own at the same moment, and lru_cache alone would load twice."""
    with _LOAD_LOCK:
        return _load_encoder()


@lru_cache(maxsize=1)
def _load_encoder():
    try:
        from interp.scorers import minilm_encoder

        return minilm_encoder()
    except Exception as e:  # noqa: BLE001 - any failure to load the model means "no semantic arm", said once
        raise SemanticUnavailable(f"the MiniLM model cannot be loaded ({type(e).__name__}: {str(e)[:120]})") from None


def embed_pending(conn: psycopg.Connection, encoder, limit: int | None = None) -> int:
    """Embeds up to `limit` (default EMBED_PER_SEARCH) labels that have no embedding yet and stores them;
    returns how many."""
    rows = store.unembedded_labels(conn, limit or EMBED_PER_SEARCH)
    if rows:
        store.store_embeddings(conn, [r[0] for r in rows], embed([r[1] for r in rows], encoder), EMBED_MODEL)
    return len(rows)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
        return meta if (path.parent / meta["file"]).exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class LabelIndex:
    """The HNSW graph over every label, and the isolated labels again, in an index searched exactly."""
    graph: object
    isolated: object

    def __len__(self) -> int:
        return len(self.graph)


_OPEN: dict[Path, tuple[str, LabelIndex | None]] = {}   # meta path -> (index file, index) open in this process


def sync_index(conn: psycopg.Connection, index_dir: str, rebuild: bool = False) -> LabelIndex | None:
    """The label index holding every stored embedding, or None when there is none. Up to date: opened
    memory-mapped (instant whatever its size) and kept open; behind: loaded, caught up and saved under the
    lock; unreadable or `rebuild`: rebuilt from Postgres."""
    try:
        import usearch.index  # noqa: F401 - only to say so in one line when it is missing
    except ImportError as e:
        raise SemanticUnavailable(f"usearch cannot be imported ({e}); pip install usearch") from None
    catalog = store.catalog_uuid(conn)
    path = meta_path(index_dir, catalog)
    try:
        meta = None if rebuild else _read_meta(path)
        if meta is not None and store.last_seq(conn) == meta["seq"]:
            index = _view(path, meta["file"])
            if index is not None:
                return index
            rebuild = True
        with _locked(path):
            return _catch_up(conn, path, catalog, rebuild)
    except OSError as e:
        raise SemanticUnavailable(f"the label index at {path} cannot be written ({e.strerror or e})") from None


def _restore(file: Path, view: bool) -> LabelIndex | None:
    """The index in `file` and its isolated labels beside it, or None when either cannot be read (they are then
    rebuilt from Postgres)."""
    from usearch.index import Index

    try:
        graph, isolated = (Index.restore(str(f), view=view) for f in (file, _isolated_file(file)))
    except (RuntimeError, ValueError):
        return None
    return LabelIndex(graph, isolated) if graph is not None and isolated is not None else None


def _isolated_file(file: Path) -> Path:
    return file.with_suffix(".isolated.usearch")


def _new_index(ndim: int) -> LabelIndex:
    from usearch.index import Index

    return LabelIndex(Index(ndim=ndim, metric="cos", dtype="f16", **HNSW),
                      Index(ndim=ndim, metric="cos", dtype="f16"))


def _add(index: LabelIndex, ids: np.ndarray, vecs: np.ndarray) -> None:
    """Adds labels to the graph, and those of them that are isolated (see ISOLATED_BELOW) to the side index."""
    index.graph.add(ids, vecs, log=False)
    graph, expansion = index.graph, index.graph.expansion_search
    graph.expansion_search = ISOLATION_EXPANSION
    try:
        near = graph.search(vecs, 3)
    finally:
        graph.expansion_search = expansion
    keys, dists = np.atleast_2d(near.keys), np.atleast_2d(near.distances)
    # a graph of fewer than 3 labels answers fewer: one query gets a shorter list, a batch pads its rows (key 0,
    # distance NaN) past each row's count
    counts = getattr(near, "counts", None)
    found = np.arange(keys.shape[1]) < (np.atleast_1d(counts)[:, None] if counts is not None else keys.shape[1])
    sims = 1.0 - np.where(found & (keys != ids[:, None]), dists, 2.0)      # cosine distance 2: similarity -1
    sims = np.pad(sims, ((0, 0), (0, max(0, 2 - sims.shape[1]))), constant_values=-1.0)
    alone = np.sort(sims, axis=1)[:, -2] < ISOLATED_BELOW
    if alone.any():
        index.isolated.add(ids[alone], vecs[alone], log=False)


def _view(path: Path, file: str):
    cached = _OPEN.get(path)
    if cached is None or cached[0] != file or cached[1] is None:
        cached = _OPEN[path] = (file, _restore(path.parent / file, view=True))
    return cached[1]


def _catch_up(conn: psycopg.Connection, path: Path, catalog: str, rebuild: bool) -> LabelIndex | None:
    meta = _read_meta(path)       # again, under the lock: another process may have caught up meanwhile
    index = _restore(path.parent / meta["file"], view=False) if meta is not None and not rebuild else None
    seq = int(meta["seq"]) if index is not None else 0
    added = 0
    for ids, vecs, last in store.embeddings_since(conn, seq):
        if index is None:
            index = _new_index(vecs.shape[1])
        _add(index, ids, vecs)
        seq, added = last, added + len(ids)
    if index is not None and (added or rebuild or meta is None or seq != int(meta["seq"])):
        new = {"catalog": catalog, "seq": seq, "model": EMBED_MODEL}
        _save(index, path, new, meta)
        _OPEN[path] = (new["file"], index)
    return index


def _save(index: LabelIndex, path: Path, meta: dict, old: dict | None) -> None:
    """New index files under their own name, then the meta file replaced to point at them, then the old files
    gone."""
    meta["file"] = f"{path.stem}-{meta['seq']}.usearch"
    file = path.parent / meta["file"]
    index.isolated.save(str(_isolated_file(file)))
    index.graph.save(str(file))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)
    if old is not None and old.get("file") != meta["file"]:
        for f in (path.parent / old["file"], _isolated_file(path.parent / old["file"])):
            f.unlink(missing_ok=True)


def nearest(index: LabelIndex | None, vec: np.ndarray, k: int,
            min_similarity: float = MIN_SIMILARITY) -> list[tuple[int, float]]:
    """(explanation id, cosine) nearest to `vec`: at most k, cosine at least min_similarity, best first; from
    the graph's walk and the exact search of the isolated labels."""
    if index is None or len(index) == 0:
        return []
    vec = vec.astype(np.float32)
    # the exact search (~4 ms over the 27 k isolated labels of 1 M) runs beside the walk: usearch frees the GIL
    exact = (_EXACT.submit(index.isolated.search, vec, min(k, len(index.isolated)), exact=True)
             if len(index.isolated) else None)
    searches = [index.graph.search(vec, min(k, len(index.graph)))] + ([exact.result()] if exact else [])
    found: dict[int, float] = {}
    for matches in searches:
        for key, dist in zip(matches.keys, matches.distances):
            if 1.0 - dist >= min_similarity:
                found[int(key)] = max(found.get(int(key), -1.0), 1.0 - float(dist))
    return sorted(found.items(), key=lambda kv: -kv[1])[:k]

