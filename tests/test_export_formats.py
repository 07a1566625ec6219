"""Exports against the real Postgres, from a real harvest (MiniLM + a small SAE over the builtin corpus) with
labels and scores written through the store's upserts: every format read back, the filters, the examples,
atomic writes under interruption, bad paths, and no secret in any export."""
import csv
import gzip
import json
import os
import sys
import uuid

import pytest
import torch

from interp import export as exporter
from interp.records import Explanation, Score
from interp.store import export as store
from interp.store.features import load_feature_examples
from interp.store.labels import upsert_explanation, upsert_score
from sae.archs import SAEConfig, build
from sae.configs import HarvestConfig
from sae.formats import save_native
from tests.helpers import URL

SECRET = "sk-test-SECRET-do-not-export-123"
N_LATENTS = 96


@pytest.fixture(scope="module")
def sae(conn, tmp_path_factory):
    """A harvested SAE; features 0..9 labelled (feature 3 twice, feature 4's label failed with a secret in
    its failure text), scored by embedding and detection (one detection score failed)."""
    from interp.harvest_job import harvest_to_catalog

    torch.manual_seed(0)
    model = build(SAEConfig(d_in=384, n_latents=N_LATENTS, k=6, model="minilm", layer=1, site="resid"))
    path = str(save_native(model, tmp_path_factory.mktemp("sae") / "minilm-l1"))
    name = f"t_export_{uuid.uuid4().hex[:8]}"
    harvest_to_catalog(path, name, "builtin", 1024, cfg=HarvestConfig(top_k=5, window=16, ctx_len=32), batch_size=8,
                       device="cpu", progress=False, url=URL)
    sid = conn.execute("SELECT id FROM saes WHERE name = %s", (name,)).fetchone()[0]
    for i in range(10):
        ok = i != 4
        ex = Explanation(sae=name, index=i, label=f"label {i}, with \"quotes\"\nand a newline" if ok else None,
                         explainer="openai:stub", prompt_version="explain-v1",
                         failure=None if ok else f"error: 401 invalid key {SECRET}")
        eid = upsert_explanation(conn, sid, ex)
        if not ok:
            continue
        upsert_score(conn, eid, Score(sae=name, index=i, scorer="embedding", simulator="minilm",
                                      prompt_version="embedding-v1", label=ex.label, method="embedding",
                                      value=i / 10, values={"auroc": i / 10}))
        det_ok = i % 3 != 0
        upsert_score(conn, eid, Score(sae=name, index=i, scorer="detection", simulator="openai:stub",
                                      prompt_version="detection-v1", label=ex.label, method="json",
                                      value=1 - i / 10 if det_ok else None,
                                      failure=None if det_ok else f"error: {SECRET}"))
    eid = upsert_explanation(conn, sid, Explanation(sae=name, index=3, label="second label of three",
                                                    explainer="baseline", prompt_version="baseline-v1",
                                                    is_baseline=True))
    upsert_score(conn, eid, Score(sae=name, index=3, scorer="embedding", simulator="minilm",
                                  prompt_version="embedding-v1", label="second label of three",
                                  method="embedding", value=0.05))
    yield name, sid
    conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def expected_explanations(conn, sid, idx):
    from interp.store.labels import labels_of

    return [{"label": lv.label, "explainer": lv.explainer, "prompt_version": lv.prompt_version,
             "is_baseline": lv.is_baseline,
             "scores": [{"scorer": s.scorer, "simulator": s.simulator, "value": s.value, "method": s.method}
                        for s in sorted(lv.scores, key=lambda s: (s.scorer, s.simulator)) if s.value is not None]}
            for lv in labels_of(conn, sid, idx) if lv.label is not None]


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_jsonl_has_the_issue_keys_and_round_trips(conn, sae, tmp_path):
    name, sid = sae
    out = tmp_path / "cat.jsonl"
    summary = exporter.export(conn, name, "jsonl", str(out))
    rows = read_jsonl(out)
    assert summary.features == len(rows) == N_LATENTS and summary.explanations == 10
    assert [r["index"] for r in rows] == list(range(N_LATENTS))
    for r in rows:
        assert list(r) == ["sae", "index", "density", "max_act", "mean_act", "explanations"]
        for e in r["explanations"]:
            assert list(e) == ["label", "explainer", "prompt_version", "is_baseline", "scores"]
            assert all(list(s) == ["scorer", "simulator", "value", "method"] for s in e["scores"])
    for i in (0, 3, 4, 5, 50):
        assert rows[i]["explanations"] == expected_explanations(conn, sid, i)
    assert rows[4]["explanations"] == []                            # the failed label is not exported
    assert len(rows[3]["explanations"]) == 2
    stats = conn.execute("SELECT density, max_act, mean_act FROM features WHERE sae_id = %s AND idx = 7",
                         (sid,)).fetchone()
    assert (rows[7]["density"], rows[7]["max_act"], rows[7]["mean_act"]) == pytest.approx(stats)


def test_parquet_round_trips_in_row_groups(conn, sae, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    name, _ = sae
    monkeypatch.setattr(exporter, "ROW_GROUP", 32)
    monkeypatch.setattr(store, "BATCH", 10)
    exporter.export(conn, name, "jsonl", str(tmp_path / "a.jsonl"))
    exporter.export(conn, name, "parquet", str(tmp_path / "a.parquet"))
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert meta.num_rows == N_LATENTS and meta.num_row_groups == 3          # 96 rows in groups of 32
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.field("explanations").type.value_type.field("scores") is not None
    got, want = table.to_pylist(), read_jsonl(tmp_path / "a.jsonl")
    for g, w in zip(got, want):
        assert (g["sae"], g["index"], g["explanations"]) == (w["sae"], w["index"], w["explanations"])
        assert g["density"] == pytest.approx(w["density"]) and g["max_act"] == pytest.approx(w["max_act"])


def test_csv_is_one_row_per_feature_and_label_with_a_column_per_scorer(conn, sae, tmp_path):
    name, _ = sae
    exporter.export(conn, name, "csv", str(tmp_path / "a.csv"))
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == exporter.CSV_FIELDS + ["detection", "embedding"]
    assert len(rows) == N_LATENTS + 1                    # feature 3 has two labels, feature 4 none (one empty row)
    by = {(r["index"], r["label"]): r for r in rows}
    r5 = by[("5", 'label 5, with "quotes"\nand a newline')]   # quotes and newline survive CSV quoting
    assert float(r5["embedding"]) == pytest.approx(0.5) and float(r5["detection"]) == pytest.approx(0.5)
    assert by[("6", 'label 6, with "quotes"\nand a newline')]["detection"] == ""    # its detection failed
    assert float(by[("3", "second label of three")]["embedding"]) == pytest.approx(0.05)
    assert by[("4", "")]["explainer"] == ""


def test_min_score_and_scorer_filter_features_labels_and_scores(conn, sae, tmp_path):
    name, _ = sae
    exporter.export(conn, name, "jsonl", str(tmp_path / "f.jsonl"), min_score=0.75, scorer="embedding")
    rows = read_jsonl(tmp_path / "f.jsonl")
    assert [r["index"] for r in rows] == [8, 9]
    assert all(s["scorer"] == "embedding" for r in rows for e in r["explanations"] for s in e["scores"])
    exporter.export(conn, name, "jsonl", str(tmp_path / "g.jsonl"), min_score=0.75)
    assert [r["index"] for r in read_jsonl(tmp_path / "g.jsonl")] == [1, 2, 8, 9]   # detection 0.9, 0.8


def test_with_examples_adds_the_top_snippets(conn, sae, tmp_path):
    name, _ = sae
    exporter.export(conn, name, "jsonl", str(tmp_path / "e.jsonl"), with_examples=True)
    rows = read_jsonl(tmp_path / "e.jsonl")
    fired = [r for r in rows if r["density"] > 0]
    assert fired
    for r in fired[:5]:
        top = [e for e in load_feature_examples(conn, name, r["index"]).examples if e.kind == "top"]
        assert [x["tokens"] for x in r["examples"]] == [e.tokens for e in top]
        for x, e in zip(r["examples"], top):
            assert x["acts"] == pytest.approx(e.acts)


def test_neuronpedia_layout_batches_and_field_names(conn, sae, tmp_path, monkeypatch):
    name, _ = sae
    monkeypatch.setattr(exporter, "NP_BATCH", 40)
    out = tmp_path / "np"
    exporter.export(conn, name, "neuronpedia", str(out))
    for kind in ("features", "activations", "explanations"):
        assert sorted(os.listdir(out / kind)) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"]

    def rows(kind):
        return [json.loads(line) for n in range(3) for line in gzip.open(out / kind / f"batch-{n}.jsonl.gz", "rt")]

    feats = rows("features")
    assert [f["index"] for f in feats] == [str(i) for i in range(N_LATENTS)]
    assert {"modelId", "layer", "index", "maxActApprox", "frac_nonzero", "freq_hist_data_bar_heights"} <= set(feats[0])
    assert feats[0]["modelId"] == "minilm" and feats[0]["layer"] == f"1-{name}"
    expl = rows("explanations")
    assert len(expl) == 10
    e5 = next(e for e in expl if e["index"] == "5")
    assert e5["description"].startswith("label 5") and e5["explanationModelName"] == "openai:stub"
    assert e5["typeName"] == "explain-v1"
    assert {s["explanationScoreTypeName"] for s in e5["scores"]} == {"embedding", "detection"}
    acts = rows("activations")
    assert acts and {"tokens", "values", "maxValue", "maxValueTokenIndex", "index"} <= set(acts[0])
    a = acts[0]
    assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]


def test_no_secret_in_any_export(conn, sae, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    name, _ = sae
    for fmt in exporter.FORMATS:
        out = tmp_path / f"s.{fmt}"
        exporter.export(conn, name, fmt, str(out), with_examples=True)
        files = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else [out]
        for p in files:
            data = p.read_bytes()
            data = gzip.decompress(data) if p.suffix == ".gz" else data
            assert SECRET.encode() not in data and b"401 invalid key" not in data


def test_interrupted_export_leaves_no_file(conn, sae, tmp_path, monkeypatch):
    name, _ = sae

    def interrupting(real, after):
        def run(*args, **kwargs):
            for n, item in enumerate(real(*args, **kwargs)):
                if n == after:
                    raise KeyboardInterrupt
                yield item
        return run

    # both streams: records (csv, neuronpedia) and COPY'd JSON lines (jsonl, parquet)
    monkeypatch.setattr(store, "stream_features", interrupting(store.stream_features, 2))
    monkeypatch.setattr(store, "feature_json_lines", interrupting(store.feature_json_lines, 30))
    monkeypatch.setattr(store, "BATCH", 10)
    monkeypatch.setattr(exporter, "NP_BATCH", 10)
    for fmt in exporter.FORMATS:
        out = tmp_path / f"i.{fmt}"
        with pytest.raises(KeyboardInterrupt):
            exporter.export(conn, name, fmt, str(out))
        assert os.listdir(tmp_path) == [], fmt                   # neither the file nor a partial one
    (tmp_path / "keep.jsonl").write_text("previous export\n")
    with pytest.raises(KeyboardInterrupt):
        exporter.export(conn, name, "jsonl", str(tmp_path / "keep.jsonl"))
    assert (tmp_path / "keep.jsonl").read_text() == "previous export\n"   # the old file stays whole


def test_bad_targets_and_names_are_one_line(conn, sae, tmp_path, capsys, monkeypatch):
    from interp.cli import main

    name, _ = sae
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(["--sae", name, "--format", "jsonl", "--out", "/proc/nope/a.jsonl"], "cannot write"),
             (["--sae", name, "--format", "jsonl", "--out", str(tmp_path / "missing" / "a.jsonl")], "cannot write"),
             (["--sae", name, "--format", "jsonl", "--out", str(tmp_path)], "is a folder"),
             (["--sae", name, "--format", "neuronpedia", "--out", str(tmp_path / "full")], "not an empty folder"),
             (["--sae", name, "--format", "xml", "--out", str(tmp_path / "a.xml")], "jsonl, parquet, csv"),
             (["--sae", name, "--format", "csv", "--out", str(tmp_path / "a.csv"), "--scorer", "vibes"], "known:"),
             (["--sae", "no-such-sae", "--format", "csv", "--out", str(tmp_path / "a.csv")], "known:")]
    for args, expect in cases:
        monkeypatch.setattr(sys, "argv", ["interp", "export", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        assert e.value.code == 2 and out.out == ""
        assert out.err.count("\n") == 1 and out.err.startswith("error: ") and expect in out.err, out.err
    assert sorted(os.listdir(tmp_path)) == ["full"]

