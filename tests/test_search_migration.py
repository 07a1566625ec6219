"""Migration 004 on a fresh database, with a 003 (the jobs migration, written elsewhere) applied before it or
arriving after it: both orders end with the same search schema and leave the jobs tables to 003. Migration 006
on a catalog that already holds labels."""
import shutil

import psycopg
import pytest

from interp.db import MIGRATIONS, connect, migrate

JOBS_003 = "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS tokens bigint NOT NULL DEFAULT 0;\n"


def folder_with(tmp_path, names, extra=None):
    for p in MIGRATIONS.glob("*.sql"):
        if p.stem in names:
            shutil.copy(p, tmp_path / p.name)
    for fname, text in (extra or {}).items():
        (tmp_path / fname).write_text(text)
    return tmp_path


def search_schema(conn):
    cols = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'explanations'"
                        " AND column_name IN ('label_tsv', 'embedded') ORDER BY 1").fetchall()
    idx = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'explanations'"
                       " AND indexname IN ('explanations_label_tsv', 'explanations_unembedded') ORDER BY 1").fetchall()
    return cols, idx, conn.execute("SELECT count(*) FROM search_catalog").fetchone()[0]


def test_004_after_003(fresh_db, tmp_path):
    folder = folder_with(tmp_path, {"001_catalog", "002_weights_sha", "004_search"}, {"003_jobs.sql": JOBS_003})
    with connect(fresh_db) as conn:
        assert migrate(conn, folder) == ["001_catalog", "002_weights_sha", "003_jobs", "004_search"]
        assert search_schema(conn) == ([("embedded",), ("label_tsv",)],
                                       [("explanations_label_tsv",), ("explanations_unembedded",)], 1)
        assert conn.execute("SELECT tokens FROM jobs LIMIT 0").description[0].name == "tokens"
        assert migrate(conn, folder) == []


def test_003_arriving_after_004_still_applies(fresh_db, tmp_path):
    folder = folder_with(tmp_path, {"001_catalog", "002_weights_sha", "004_search"})
    with connect(fresh_db) as conn:
        assert migrate(conn, folder)[-1] == "004_search"
        (folder / "003_jobs.sql").write_text(JOBS_003)
        assert migrate(conn, folder) == ["003_jobs"]
        conn.execute("INSERT INTO saes (name, model, layer, site, d_in, n_features, arch)"
                     " VALUES ('s', 'm', 0, 'resid', 1, 1, 'topk')")
        conn.execute("INSERT INTO explanations (sae_id, feature, explainer, prompt_version, label)"
                     " SELECT id, 0, 'x', 'v', 'Golden Gate Bridges' FROM saes")
        tsv = conn.execute("SELECT label_tsv::text FROM explanations").fetchone()[0]
        assert tsv == "'bridg':3 'gate':2 'golden':1"              # generated, stemmed, stored
        with pytest.raises(psycopg.errors.GeneratedAlways):
            conn.execute("UPDATE explanations SET label_tsv = ''")


def test_007_takes_the_words_of_stored_labels_and_drops_the_label_trigram_index(fresh_db, tmp_path):
    folder = folder_with(tmp_path, {"001_catalog", "002_weights_sha", "003_jobs", "004_search", "005_harvest_jobs"})
    with connect(fresh_db) as conn:
        migrate(conn, folder)
        conn.execute("INSERT INTO saes (name, model, layer, site, d_in, n_features, arch)"
                     " VALUES ('s', 'm', 0, 'resid', 1, 1, 'topk')")
        conn.execute("INSERT INTO explanations (sae_id, feature, explainer, prompt_version, label)"
                     " SELECT id, 0, 'x', 'v', 'Golden Gate-Bridges, 1937' FROM saes")
        shutil.copy(MIGRATIONS / "007_label_words.sql", folder)
        assert migrate(conn, folder) == ["007_label_words"]
        words = conn.execute("SELECT word FROM label_words ORDER BY 1").fetchall()
        assert [w for (w,) in words] == ["1937", "bridges", "gate", "golden"]     # as pg_trgm splits words
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'explanations_label_trgm'"
                            ).fetchone()[0] == 0
