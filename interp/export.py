"""Exporting an SAE's scored catalog: jsonl, parquet, csv or Neuronpedia's upload layout, streamed from the
store a batch at a time (memory stays flat whatever the size) and written to a temporary sibling that is renamed
into place only when complete, so an interrupted export never leaves a file that looks finished.

Neuronpedia layout (their export/import scripts' field names), one folder per kind of row, `batch-N.jsonl.gz`
files of NP_BATCH features each:
- features/:     modelId, layer, index (a string), maxActApprox (max_act), frac_nonzero (density), hasVector,
                 pos_str/pos_values and neg_str/neg_values (the decoder's top/bottom logits, when stored),
                 freq_hist_data_bar_heights/values (the activation histogram: counts and bin centres)
- activations/:  modelId, layer, index, tokens, values, maxValue, maxValueTokenIndex, minValue (top snippets)
- explanations/: modelId, layer, index, description (label), explanationModelName (explainer), typeName
                 (prompt_version), scores [{explanationScoreTypeName (scorer), explanationScoreModelName
                 (simulator), value}]
`layer` is their source id, "<layer>-<sae name>"; modelId is the SAE's model as recorded. Their own ids
(cuid) and creatorId are left for their importer to assign.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from pydantic import BaseModel

from interp.store import export as store
from interp.store.saes import require_sae
from interp.store.search import Filters
from sae.errors import InputError

FORMATS = ("jsonl", "parquet", "csv", "neuronpedia")
NP_BATCH = 1024
ROW_GROUP = 65_536
CSV_FIELDS = ["sae", "index", "density", "max_act", "mean_act", "label", "explainer", "prompt_version", "is_baseline"]


class ExportSummary(BaseModel):
    path: str
    format: str
    features: int
    explanations: int
    seconds: float


@contextmanager
def atomic_target(out: str, is_dir: bool):
    """A temporary sibling of `out` to write into; renamed onto `out` on success, removed on any failure or
    interrupt. An unwritable place is one line."""
    path = Path(out).expanduser()
    if is_dir and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} exists and is not an empty folder; remove it or choose another --out")
    if path.is_dir() and not is_dir:
        raise InputError(f"{path} is a folder; --out needs a file name for this format")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.mkdir() if is_dir else tmp.touch()
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        if is_dir and path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def feature_dict(f: store.ExportFeature) -> dict:
    d = {"sae": f.sae, "index": f.index, "density": f.density, "max_act": f.max_act, "mean_act": f.mean_act,
         "explanations": [{"label": e.label, "explainer": e.explainer, "prompt_version": e.prompt_version,
                           "is_baseline": e.is_baseline,
                           "scores": [{"scorer": s.scorer, "simulator": s.simulator, "value": s.value,
                                       "method": s.method} for s in e.scores]} for e in f.explanations]}
    if f.examples is not None:
        d["examples"] = [{"tokens": x.tokens, "acts": x.acts} for x in f.examples]
    return d


def write_jsonl(batches: Iterator[list[store.ExportFeature]], tmp: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as fh:
        for feats in batches:
            fh.write("".join(json.dumps(feature_dict(f), ensure_ascii=False) + "\n" for f in feats))


def write_json_lines(lines: Iterator[bytes], tmp: Path) -> int:
    n = 0
    with open(tmp, "wb") as fh:
        for line in lines:
            fh.write(line)
            n += 1
    return n


def write_parquet_lines(lines: Iterator[bytes], tmp: Path) -> int:
    """Parquet from the JSON lines: ROW_GROUP lines at a time parsed by Arrow's JSON reader against the explicit
    schema (C++, no Python object per value) and written as one row group."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    schema = parquet_schema(False)
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    n = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for group in _groups(lines, ROW_GROUP):
            block = b"".join(group)
            table = pj.read_json(io.BytesIO(block), parse_options=opts,
                                 read_options=pj.ReadOptions(block_size=max(len(block), 1 << 20)))
            writer.write_table(table.select(schema.names).cast(schema), row_group_size=ROW_GROUP)
            n += len(group)
    return n


def _groups(items: Iterator, size: int) -> Iterator[list]:
    group = []
    for x in items:
        group.append(x)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def parquet_schema(with_examples: bool):
    import pyarrow as pa

    score = pa.struct([("scorer", pa.string()), ("simulator", pa.string()), ("value", pa.float64()),
                       ("method", pa.string())])
    expl = pa.struct([("label", pa.string()), ("explainer", pa.string()), ("prompt_version", pa.string()),
                      ("is_baseline", pa.bool_()), ("scores", pa.list_(score))])
    fields = [("sae", pa.string()), ("index", pa.int32()), ("density", pa.float32()), ("max_act", pa.float32()),
              ("mean_act", pa.float32()), ("explanations", pa.list_(expl))]
    if with_examples:
        fields.append(("examples", pa.list_(pa.struct([("tokens", pa.list_(pa.string())),
                                                       ("acts", pa.list_(pa.float32()))]))))
    return pa.schema(fields)


def write_parquet(batches: Iterator[list[store.ExportFeature]], tmp: Path, with_examples: bool) -> None:
    """Row groups of ROW_GROUP features: only one group's rows are held before they are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(with_examples)
    pending: list[dict] = []
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for feats in batches:
            pending.extend(feature_dict(f) for f in feats)
            while len(pending) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(pending[:ROW_GROUP], schema=schema), row_group_size=ROW_GROUP)
                pending = pending[ROW_GROUP:]
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema), row_group_size=ROW_GROUP)


def write_csv(batches: Iterator[list[store.ExportFeature]], tmp: Path, scorers: list[str]) -> None:
    """One row per (feature, label), one column per scorer (the best value over simulators); a feature with
    no label keeps one row with empty label columns."""
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS + scorers)
        for feats in batches:
            for f in feats:
                head = [f.sae, f.index, f.density, f.max_act, f.mean_act]
                if not f.explanations:
                    w.writerow(head + [""] * (len(CSV_FIELDS) - len(head) + len(scorers)))
                for e in f.explanations:
                    best: dict[str, float] = {}
                    for s in e.scores:
                        best[s.scorer] = max(best.get(s.scorer, s.value), s.value)
                    w.writerow(head + [e.label, e.explainer, e.prompt_version, e.is_baseline]
                               + [best.get(s, "") for s in scorers])


def export(conn: psycopg.Connection, sae: str, fmt: str, out: str, *, min_score: float | None = None,
           scorer: str | None = None, with_examples: bool = False) -> ExportSummary:
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    from interp.search import check_scorer

    check_scorer(scorer)
    sid = require_sae(conn, sae)
    flt = Filters(scorer=scorer, min_score=min_score)
    t0 = time.perf_counter()
    counts = {"features": 0, "explanations": 0}

    def counted(batches):
        for feats in batches:
            counts["features"] += len(feats)
            counts["explanations"] += sum(len(f.explanations) for f in feats)
            yield feats

    batch = NP_BATCH if fmt == "neuronpedia" else store.BATCH
    examples = with_examples or fmt == "neuronpedia"   # Neuronpedia's dashboards are built on the snippets
    with atomic_target(out, is_dir=fmt == "neuronpedia") as tmp:
        batches = counted(store.stream_features(conn, sae, sid, flt, with_examples=examples, batch=batch))
        if fmt in ("jsonl", "parquet") and not examples:
            # the fast path: Postgres writes the JSON, Python moves bytes (and Arrow parses them for parquet)
            write = write_json_lines if fmt == "jsonl" else write_parquet_lines
            counts["features"] = write(store.feature_json_lines(conn, sae, sid, flt), tmp)
            counts["explanations"] = store.count_labels(conn, sid, flt)
        elif fmt == "jsonl":
            write_jsonl(batches, tmp)
        elif fmt == "parquet":
            write_parquet(batches, tmp, examples)
        elif fmt == "csv":
            write_csv(batches, tmp, [scorer] if scorer else store.scorers_of(conn, sid))
        else:
            from interp.neuronpedia import write_neuronpedia

            write_neuronpedia(conn, sid, sae, batches, tmp)
    return ExportSummary(path=str(Path(out).expanduser()), format=fmt, seconds=round(time.perf_counter() - t0, 3),
                         **counts)
