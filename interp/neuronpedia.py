"""Neuronpedia's upload layout (field names as in their export/import scripts; the mapping is in
`interp.export`'s docstring): features/, activations/ and explanations/ folders of batch-N.jsonl.gz files,
one file of each per batch of features."""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import psycopg

from interp.store import export as store

GZIP_LEVEL = 5   # their scripts' level: most of the size win of 9 at a fraction of the time


def _logits(ids: list[int] | None, vals: list[float] | None, vocab: dict[int, str]) -> tuple[list, list]:
    if not ids:
        return [], []
    return [vocab.get(t, f"<{t}>") for t in ids], list(vals or [])


def feature_row(f: store.ExportFeature, model: str, layer: str, vocab: dict[int, str]) -> dict:
    pos_str, pos_values = _logits(f.top_logits, f.top_logit_vals, vocab)
    neg_str, neg_values = _logits(f.bottom_logits, f.bottom_logit_vals, vocab)
    nb = len(f.hist)
    centres = [f.hist_max * (i + 0.5) / nb for i in range(nb)]
    return {"modelId": model, "layer": layer, "index": str(f.index), "maxActApprox": f.max_act,
            "frac_nonzero": f.density, "hasVector": False, "pos_str": pos_str, "pos_values": pos_values,
            "neg_str": neg_str, "neg_values": neg_values, "freq_hist_data_bar_heights": list(f.hist),
            "freq_hist_data_bar_values": centres}


def activation_rows(f: store.ExportFeature, model: str, layer: str) -> list[dict]:
    rows = []
    for x in f.examples or []:
        top = max(range(len(x.acts)), key=x.acts.__getitem__) if x.acts else 0
        rows.append({"modelId": model, "layer": layer, "index": str(f.index), "tokens": x.tokens, "values": x.acts,
                     "maxValue": max(x.acts, default=0.0), "maxValueTokenIndex": top,
                     "minValue": min(x.acts, default=0.0)})
    return rows


def explanation_rows(f: store.ExportFeature, model: str, layer: str) -> list[dict]:
    return [{"modelId": model, "layer": layer, "index": str(f.index), "description": e.label,
             "explanationModelName": e.explainer, "typeName": e.prompt_version,
             "scores": [{"explanationScoreTypeName": s.scorer, "explanationScoreModelName": s.simulator,
                         "value": s.value} for s in e.scores]} for e in f.explanations]


def _write(path: Path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=GZIP_LEVEL) as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_neuronpedia(conn: psycopg.Connection, sid: int, sae: str,
                      batches: Iterator[list[store.ExportFeature]], folder: Path) -> None:
    info = store.sae_info(conn, sid)
    layer = f"{info.layer}-{sae}"
    for kind in ("features", "activations", "explanations"):
        (folder / kind).mkdir()
    for n, feats in enumerate(batches):
        ids = {t for f in feats for t in (f.top_logits or []) + (f.bottom_logits or [])}
        vocab = store.decode_tokens(conn, sid, ids) if ids else {}
        _write(folder / "features" / f"batch-{n}.jsonl.gz", (feature_row(f, info.model, layer, vocab) for f in feats))
        _write(folder / "activations" / f"batch-{n}.jsonl.gz",
               (r for f in feats for r in activation_rows(f, info.model, layer)))
        _write(folder / "explanations" / f"batch-{n}.jsonl.gz",
               (r for f in feats for r in explanation_rows(f, info.model, layer)))
