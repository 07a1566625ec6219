"""Migration 004 on a fresh database, with a 003 (the jobs migration, written elsewhere) applied before it or
arriving after it: both orders end with the same search schema and leave the jobs tables to 003."""
import os
import shutil
import uuid

import psycopg
import pytest

from interp.db import MIGRATIONS, connect, migrate

URL = os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")
JOBS_003 = "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS tokens bigint NOT NULL DEFAULT 0;\n"


@pytest.fixture
def fresh_db():
    name = f"t_mig_{uuid.uuid4().hex[:8]}"
    admin = connect(URL)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


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
