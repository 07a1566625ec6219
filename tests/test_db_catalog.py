"""The catalog against the real Postgres: migrations, a harvest written and read back, replace semantics,
and the CLI's bad-input and crash behaviour."""
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
import torch

from interp.db import connect, migrate, migration_files
from interp.store.features import load_feature_examples
from interp.store.harvest import write_harvest
from interp.store.saes import SAEMeta
from sae.archs import SAEConfig, build
from sae.errors import InputError
from sae.formats import save_native
from sae.harvest import HarvestConfig, harvest
from sae.models import hooked
from tests.helpers import ENV, URL, catalog_rows, harvest_args


# ---------------------------------------------------------------- migrations
def test_migrate_twice_is_a_noop_and_concurrent_migrates_do_not_race():
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    admin = connect(URL)
    admin.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{URL}?options=-csearch_path%3D{schema},public"
    results, errors = [], []

    def run():
        try:
            with connect(url) as c:
                results.append(migrate(c))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    try:
        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        # each migration applied exactly once, whichever migrator got to it
        assert sorted(sum(results, [])) == [name for name, _ in migration_files()]
        with connect(url) as c:
            assert migrate(c) == []
            assert c.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(migration_files())
            assert c.execute("SELECT to_regclass('examples')").fetchone()[0] is not None
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


# ---------------------------------------------------------------- write and read back
@pytest.fixture(scope="module")
def harvested(sae_dir):
    from sae.formats import load_sae

    sae = load_sae(sae_dir)
    hm = hooked("minilm", 1, "resid", "cpu")
    state = harvest(hm, sae, "builtin", 1024, HarvestConfig(top_k=10, window=16, ctx_len=32), batch_size=8,
                    progress=False)
    return sae, hm, state.result()


def _write(conn, name, sae, hm, res, replace=False):
    from interp.harvest_job import tokenizer_vocab
    from interp.store.vocab import store_vocab, vocab_key

    vocab = tokenizer_vocab(hm.tokenizer)
    key = vocab_key("minilm", vocab)
    store_vocab(conn, key, vocab)
    c = sae.cfg
    meta = SAEMeta(c.model, c.layer, c.site, c.d_in, c.n_latents, c.arch, c.k, metrics={"fvu": 0.5})
    return write_harvest(conn, name, meta, res, tokenizer=key, replace=replace)


def test_written_features_read_back_as_harvested(conn, names, harvested):
    sae, hm, res = harvested
    name = names()
    from interp.harvest_job import tokenizer_vocab

    vocab = tokenizer_vocab(hm.tokenizer)
    out = _write(conn, name, sae, hm, res)
    assert out["features"] == 128 and out["examples"] == len(res.examples)
    for i in range(0, 128, 9):
        got = load_feature_examples(conn, name, i)
        want = res.feature_examples(i)
        assert got.max_act == pytest.approx(want.max_act) and got.density == pytest.approx(want.density)
        assert [(e.kind, e.split, e.quantile_bin, e.token_ids) for e in got.examples] == \
               [(e.kind, e.split, e.quantile_bin, e.token_ids) for e in want.examples]
        for g, w in zip(got.examples, want.examples):
            np.testing.assert_allclose(g.acts, w.acts, rtol=1e-5, atol=1e-6)
            assert g.tokens == [vocab[t] for t in g.token_ids]     # each id decoded on its own, as stored
        explain = {tuple(e.token_ids) for e in got.split("explain")}
        assert not explain & {tuple(e.token_ids) for e in got.split("score")}
    # the vocabulary decodes snippets without a model: the word pieces rebuild the text
    e = load_feature_examples(conn, name, 0).examples[0]
    assert e.tokens == [hm.tokenizer.decode([t]) for t in e.token_ids]
    with pytest.raises(InputError, match="no feature 500"):
        load_feature_examples(conn, name, 500)


def test_a_write_leaves_planner_statistics_on_the_partitions_it_filled(conn, names, harvested):
    sae, hm, res = harvested
    sid = _write(conn, names(), sae, hm, res)["sae_id"]
    for table in ("features", "contexts", "examples"):
        part = conn.execute(f"SELECT tableoid::regclass::text FROM {table} WHERE sae_id = %s LIMIT 1", (sid,)).fetchone()[0]
        n = conn.execute(f"SELECT count(*) FROM {part}").fetchone()[0]
        assert conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (part,)).fetchone()[0] == n


def test_existing_name_needs_replace_and_replace_swaps_everything(conn, names, harvested):
    sae, hm, res = harvested
    name = names()
    first = _write(conn, name, sae, hm, res)
    with pytest.raises(InputError, match="exists already"):
        _write(conn, name, sae, hm, res)
    second = _write(conn, name, sae, hm, res, replace=True)
    assert second["sae_id"] != first["sae_id"]
    for table in ("features", "examples", "contexts"):
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE sae_id = %s", (first["sae_id"],)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM features WHERE sae_id = %s", (second["sae_id"],)).fetchone()[0] == 128


def test_deleting_saes_deletes_their_catalog_rows_and_no_others(conn, names, harvested):
    sae, hm, res = harvested
    a, b, keep = (_write(conn, names(), sae, hm, res)["sae_id"] for _ in range(3))
    conn.execute("DELETE FROM saes WHERE id = ANY(%s)", ([a, b],))
    for table in ("features", "examples", "contexts"):
        left = dict(conn.execute(f"SELECT sae_id, count(*) FROM {table} WHERE sae_id = ANY(%s) GROUP BY sae_id",
                                 ([a, b, keep],)).fetchall())
        assert set(left) == {keep}, table


def test_writing_in_feature_chunks_equals_writing_the_whole_result(conn, names, sae_dir):
    from sae.formats import load_sae

    sae = load_sae(sae_dir)
    hm = hooked("minilm", 1, "resid", "cpu")
    state = harvest(hm, sae, "builtin", 1024, HarvestConfig(top_k=10, window=16, ctx_len=32), batch_size=8,
                    progress=False)
    whole, chunked = names(), names()
    a = _write(conn, whole, sae, hm, state.result())
    b = _write(conn, chunked, sae, hm, state.result_chunks(chunk=20))   # 7 chunks, sharing contexts
    assert {k: v for k, v in a.items() if k != "sae_id"} == {k: v for k, v in b.items() if k != "sae_id"}
    assert catalog_rows(conn, chunked) == catalog_rows(conn, whole)
    ctxs = lambda sid: conn.execute("SELECT ctx, token_ids FROM contexts WHERE sae_id = %s ORDER BY ctx",
                                    (sid,)).fetchall()
    assert ctxs(b["sae_id"]) == ctxs(a["sae_id"])


# ---------------------------------------------------------------- the CLI
def test_cli_harvest_json_feature_view_and_name_clash(conn, names, sae_dir, cli):
    name = names()
    r = cli(*harvest_args(sae_dir, name, "--json"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) == 1
    import json

    summary = json.loads(out[0])
    assert set(summary) >= {"features", "examples", "tokens", "seconds"} and summary["features"] == 128
    assert summary["examples"] == conn.execute(
        "SELECT sum(cardinality(ctx)) FROM examples e JOIN saes s ON s.id = e.sae_id WHERE s.name = %s",
        (name,)).fetchone()[0]
    best = conn.execute("SELECT idx FROM features f JOIN saes s ON s.id = f.sae_id WHERE s.name = %s"
                        " ORDER BY n_fired DESC LIMIT 1", (name,)).fetchone()[0]
    r = cli("feature", name, str(best))
    assert r.returncode == 0, r.stderr
    assert "«" in r.stdout and "histogram" in r.stdout and "top / score" in r.stdout
    r = cli(*harvest_args(sae_dir, name))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--replace" in r.stderr


def test_cli_bad_input_is_one_line_and_leaves_nothing(conn, names, sae_dir, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    wrong = build(SAEConfig(d_in=100, n_latents=64, k=4, model="minilm", layer=1))
    wrong_dir = str(save_native(wrong, tmp_path / "wrong"))
    cases = [
        (cli(*harvest_args(sae_dir, n1 := names(), "--shard", "2/2")), "expected i/n", n1),
        (cli("harvest", "--sae", sae_dir, "--name", (n2 := names()), "--corpus", str(empty), "--tokens", "512"),
         "empty", n2),
        (cli(*harvest_args(wrong_dir, n3 := names())), "d_in=100", n3),
    ]
    for r, words, name in cases:
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert words in r.stderr
        assert conn.execute("SELECT count(*) FROM saes WHERE name = %s", (name,)).fetchone()[0] == 0
    bad_url = "postgresql://127.0.0.1:1/test"
    r = cli(*harvest_args(sae_dir, names()), env={"DATABASE_URL": bad_url})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and bad_url in r.stderr, r.stderr
    r = cli("db", "migrate", env={"DATABASE_URL": bad_url})
    assert r.returncode == 2 and bad_url in r.stderr


def test_cli_shards_merge_to_the_unsharded_catalog(conn, names, sae_dir, tmp_path, cli):
    import json

    whole, sharded = names(), names()
    r = cli(*harvest_args(sae_dir, whole, "--json", tokens=1536))
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    summaries = {}
    for i in (1, 0):
        r = cli(*harvest_args(sae_dir, sharded, "--shard", f"{i}/2", "--state-dir", str(tmp_path / "st"), "--json",
                              tokens=1536))
        assert r.returncode == 0, r.stderr
        summaries[i] = json.loads(r.stdout)
        if i == 1:  # the first shard to finish waits for the other and writes nothing
            assert conn.execute("SELECT count(*) FROM saes WHERE name = %s", (sharded,)).fetchone()[0] == 0
    assert summaries[1]["waiting_for"] == [0] and summaries[1]["examples"] == 0 and summaries[1]["shard"] == "1/2"
    assert "waiting_for" not in summaries[0] and summaries[0]["examples"] == want["examples"] > 0
    assert summaries[0]["duplicates_dropped"] == want["duplicates_dropped"]
    a, b = catalog_rows(conn, whole), catalog_rows(conn, sharded)
    assert a[0] == b[0] and a[1] == b[1]


def _waiting_on_lock(conn) -> bool:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'SELECT pg_advisory_xact_lock(hashtext%%'").fetchone()[0] > 0


def test_killed_harvest_leaves_the_previous_state_and_a_rerun_works(conn, names, sae_dir, cli, tmp_path):
    name = names()
    assert cli(*harvest_args(sae_dir, name)).returncode == 0
    before = catalog_rows(conn, name)
    # 1) killed while harvesting: its progress bar (shown as on a terminal) says batches are going through
    log = tmp_path / "harvest.err"
    as_on_a_terminal = ("import sys; sys.stderr.isatty = lambda: True; from interp.cli import main; "
                        "sys.argv[0] = 'interp'; main()")
    with open(log, "wb") as err:
        p = subprocess.Popen([sys.executable, "-c", as_on_a_terminal, "harvest", "--sae", sae_dir, "--name", name,
                              "--tokens", "200000", "--ctx-len", "32", "--replace"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while "alive=" not in log.read_text(errors="replace"):
            assert p.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-500:]
            time.sleep(0.2)
        assert p.poll() is None, "the harvest ended before it could be killed mid-way"
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    assert catalog_rows(conn, name) == before
    # 2) killed after staging, at the swap: hold the SAE's lock so the swap waits, then kill it there
    with psycopg.connect(URL, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", ("sae:" + name,))
        p = subprocess.Popen([sys.executable, "-m", "interp.cli", "harvest", "--sae", sae_dir, "--name", name,
                              "--tokens", "1024", "--ctx-len", "32", "--ctx", "16", "--top", "10",
                              "--batch-size", "8", "--replace"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while not _waiting_on_lock(conn):
            assert p.poll() is None and time.time() < deadline, "the harvest never reached the swap"
            time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", ("sae:" + name,))
    time.sleep(0.5)
    assert catalog_rows(conn, name) == before
    r = cli(*harvest_args(sae_dir, name, "--replace", "--json"))
    assert r.returncode == 0, r.stderr
    assert catalog_rows(conn, name) == before  # same SAE, same corpus: the same catalog, freshly written


def test_causal_lm_harvest_stores_logit_tokens(conn, names, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from interp.harvest_job import harvest_to_catalog
    from interp.store.features import feature_view
    from sae.models import load_tokenizer

    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    sae = build(SAEConfig(d_in=32, n_latents=48, k=4, model=str(tmp_path / "gpt2"), layer=1, site="mlp"))
    name = names()
    out = harvest_to_catalog(str(save_native(sae, tmp_path / "sae")), name, "builtin", 512,
                             cfg=HarvestConfig(top_k=10, window=16, ctx_len=32), device="cpu", progress=False, url=URL)
    assert out["features"] == 48 and out["tokens"] > 0
    v = feature_view(conn, name, 0)
    W = (sae.W_dec.detach() @ GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").lm_head.weight.T)[0]
    want = [tok.decode([i]) for i in W.topk(10).indices.tolist()]
    assert v.top_logits == want and len(v.bottom_logits) == 10
