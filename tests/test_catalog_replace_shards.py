"""Against the real Postgres: shards finishing at the same moment merge exactly once, and --replace keeps an
SAE's labels when its weights are unchanged and drops them when they changed."""
import json
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import torch

from interp.db import connect
from interp.harvest_job import harvest_to_catalog
from interp.store.features import feature_view
from sae.archs import SAEConfig, build
from sae.configs import HarvestConfig
from sae.formats import convert, load_sae, save_native
from tests.helpers import ENV, URL, catalog_rows, harvest_args

TOKENS = 1536


@pytest.fixture(scope="module")
def reference(conn, sae_dir):
    """The unsharded catalog rows of sae_dir over TOKENS builtin tokens."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    harvest_to_catalog(sae_dir, name, "builtin", TOKENS, cfg=HarvestConfig(top_k=10, window=16, ctx_len=32),
                       batch_size=8, device="cpu", progress=False, url=URL)
    yield catalog_rows(conn, name)
    conn.execute("DELETE FROM saes WHERE name = %s", (name,))


def _lock_waiters(conn, key: str) -> int:
    # pg_locks splits an advisory bigint key into classid (high 32 bits) and objid (low 32 bits)
    return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                        " AND objid::bigint = (hashtext(%s)::bigint & 4294967295)", (key,)).fetchone()[0]


def test_shards_finishing_together_merge_exactly_once(conn, names, sae_dir, tmp_path, reference):
    name, states = names(), tmp_path / "states"
    key = "harvest-merge:" + name
    # the test holds the merge lock, so both shards save their states and then queue at the claim; releasing
    # it lets them race from the same instant, each having seen both states on disk
    with psycopg.connect(URL, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
        procs = [subprocess.Popen([sys.executable, "-m", "interp.cli",
                                   *harvest_args(sae_dir, name, "--shard", f"{i}/2", "--state-dir", str(states),
                                                 "--json", tokens=TOKENS)],
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in (0, 1)]
        deadline = time.time() + 240
        while _lock_waiters(conn, key) < 2:
            assert all(p.poll() is None for p in procs) and time.time() < deadline, "the shards never met at the claim"
            time.sleep(0.2)
        assert sorted(p.name for p in states.iterdir()) == ["shard-0-of-2.pt", "shard-1-of-2.pt"]
        gate.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err
    summaries = [json.loads(out) for out, _ in results]
    merged = [s for s in summaries if "merged_by" not in s]
    assert len(merged) == 1 and "waiting_for" not in merged[0] and merged[0]["features"] == 128, summaries
    assert [s["merged_by"] for s in summaries if s is not merged[0]] == ["another shard"]
    assert catalog_rows(conn, name) == reference
    assert list(states.iterdir()) == []


def test_weights_sha_is_the_loaded_weights_whatever_the_format(sae_dir, tmp_path):
    lens = convert(sae_dir, "saelens", tmp_path / "lens")
    assert load_sae(lens).firing_sha() == load_sae(sae_dir).firing_sha()
    sae = load_sae(sae_dir)
    with torch.no_grad():
        sae.b_dec[0] += 1e-6
    assert sae.firing_sha() != load_sae(sae_dir).firing_sha()


def _add_labels(conn, sid: int, features) -> list[int]:
    ids = []
    for f in features:
        ids.append(conn.execute("INSERT INTO explanations (sae_id, feature, explainer, prompt_version, label)"
                                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                                (sid, f, "stub:model", "v1", f"label of {f}")).fetchone()[0])
        conn.execute("INSERT INTO scores (explanation_id, scorer, simulator, value) VALUES (%s, %s, %s, %s)",
                     (ids[-1], "detection", "stub:model", 0.75))
    return ids


def _count(conn, sql: str, arg) -> int:
    return conn.execute(sql, (arg,)).fetchone()[0]


def test_replace_keeps_labels_of_the_same_weights_and_drops_them_for_new_ones(conn, names, sae_dir, tmp_path, cli,
                                                                              reference):
    name = names()
    assert cli(*harvest_args(sae_dir, name, tokens=1024)).returncode == 0
    sid = _count(conn, "SELECT id FROM saes WHERE name = %s", name)
    eids = _add_labels(conn, sid, (3, 17))
    before = catalog_rows(conn, name)
    assert before != reference  # more tokens below: the re-harvest is visibly new

    # a reader polling whole snapshots during the in-place swap sees the old catalog or the new, never a mix
    seen, stop = [], threading.Event()

    def read():
        try:
            with connect(URL) as c:
                c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                while True:
                    done = stop.is_set()  # one last snapshot after the harvest returned
                    with c.transaction():
                        seen.append(catalog_rows(c, name))
                    if done:
                        break
                    time.sleep(0.02)
        except Exception as e:  # noqa: BLE001
            seen.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # the same weights, read from another format and harvested over more tokens
        lens = str(convert(sae_dir, "saelens", tmp_path / "lens"))
        r = cli(*harvest_args(lens, name, "--replace", "--json", tokens=TOKENS))
    finally:
        stop.set()
        reader.join()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labels_kept"] == 2
    assert _count(conn, "SELECT id FROM saes WHERE name = %s", name) == sid
    assert catalog_rows(conn, name) == reference
    assert seen[0] == before and seen[-1] == reference and all(s in (before, reference) for s in seen)
    assert _count(conn, "SELECT count(*) FROM scores WHERE explanation_id = ANY(%s)", eids) == 2
    v = feature_view(conn, name, 17)
    assert [(lab.label, [s.value for s in lab.scores]) for lab in v.labels] == [("label of 17", [0.75])]

    torch.manual_seed(1)
    other = save_native(build(SAEConfig(d_in=384, n_latents=128, k=6, model="minilm", layer=1, site="resid")),
                        tmp_path / "other")
    r = cli(*harvest_args(str(other), name, "--replace", "--json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labels_kept"] == 0
    new_sid = _count(conn, "SELECT id FROM saes WHERE name = %s", name)
    assert new_sid != sid
    assert _count(conn, "SELECT count(*) FROM explanations WHERE sae_id = ANY(%s)", [sid, new_sid]) == 0
    assert _count(conn, "SELECT count(*) FROM scores WHERE explanation_id = ANY(%s)", eids) == 0
    assert _count(conn, "SELECT count(*) FROM features WHERE sae_id = %s", sid) == 0
