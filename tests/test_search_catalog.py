"""Label search against the real Postgres and the real MiniLM: each arm on its own, the fusion, the filters,
the usearch index (built, caught up, rebuilt), and the bad inputs of issue 10 through the CLI."""
import json
import os
import uuid

import psycopg
import pytest

from interp.records import Explanation, Score
from interp.search import search
from interp.store import search as store
from interp.store.bulk import FeatureStats, copy_features, create_sae
from interp.store.labels import upsert_explanation, upsert_score
from interp.store.saes import SAEMeta
from sae.errors import InputError

# feature index -> (label, density, {scorer: value})
LABELS = {
    0: ("Golden Gate Bridge and other suspension bridges", 0.001, {"embedding": 0.9, "detection": 0.4}),
    1: ("references to cats and kittens", 0.002, {"embedding": 0.7}),
    2: ("Python code indentation", 0.02, {"embedding": 0.3, "detection": 0.8}),
    3: ("automobiles and trucks", 0.05, {"embedding": 0.6}),
    4: ("percent signs in tables", 0.003, {"detection": 0.5}),
    5: ("the word 'the' before nouns", 0.3, {"embedding": 0.2}),
    6: ("bridges in card games", 0.004, {"embedding": 0.1}),
}


def make_sae(conn, labels, n=10):
    name = f"t_search_{uuid.uuid4().hex[:8]}"
    sid = create_sae(conn, name, SAEMeta(model="minilm", layer=3, site="resid", d_in=384, n_features=n, arch="topk"))
    dens = {i: d for i, (_, d, _) in labels.items()}
    copy_features(conn, sid, [FeatureStats(i, dens.get(i, 0.5), 1.0, 0.5) for i in range(n)])
    for i, (label, _, scores) in labels.items():
        eid = upsert_explanation(conn, sid, Explanation(sae=name, index=i, label=label, explainer="openai:stub",
                                                        prompt_version="explain-v1"))
        for scorer, value in scores.items():
            upsert_score(conn, eid, Score(sae=name, index=i, scorer=scorer, simulator="stub", prompt_version="s1",
                                          label=label, method="json", value=value))
    return name, sid


@pytest.fixture(scope="module")
def sae(conn):
    name, sid = make_sae(conn, LABELS)
    yield name, sid
    conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


@pytest.fixture
def index_dir(tmp_path):
    return str(tmp_path / "index")


def labels_of(hits):
    return [h.label for h in hits]


def arm_labels(conn, ranked):
    by_id = {h.id: h.label for h in store.label_hits(conn, [i for i, _ in ranked])}
    return [by_id[i] for i, _ in ranked]


def test_the_feature_load_leaves_planner_statistics_on_its_partition(conn, sae):
    part = conn.execute("SELECT tableoid::regclass::text FROM features WHERE sae_id = %s LIMIT 1", (sae[1],)).fetchone()[0]
    n = conn.execute(f"SELECT count(*) FROM {part}").fetchone()[0]
    assert conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (part,)).fetchone()[0] == n


def test_full_text_arm_matches_stems_and_ranks_by_relevance(conn, sae):
    flt = store.Filters(sae_id=sae[1])
    found = arm_labels(conn, store.fulltext_arm(conn, "bridges", flt))
    assert set(found) == {LABELS[0][0], LABELS[6][0]}          # "bridge" and "bridges" share a stem
    assert arm_labels(conn, store.fulltext_arm(conn, '"golden gate"', flt)) == [LABELS[0][0]]
    assert arm_labels(conn, store.fulltext_arm(conn, "bridges -card", flt)) == [LABELS[0][0]]
    assert store.fulltext_arm(conn, "golden gat", flt) == []   # a typo is not a lexeme
    assert store.fulltext_arm(conn, "the and of", flt) == []   # stop words only: no query, no scan


def test_trigram_arm_finds_the_typo(conn, sae):
    flt = store.Filters(sae_id=sae[1])
    assert arm_labels(conn, store.trigram_arm(conn, "golden gat", flt))[0] == LABELS[0][0]
    assert arm_labels(conn, store.trigram_arm(conn, "indentaion", flt)) == [LABELS[2][0]]
    assert store.trigram_arm(conn, "!!! %% __", flt) == []     # no trigram: the arm is skipped, not a full scan


def test_every_label_write_adds_its_words_for_the_trigram_arm(conn):
    from interp.store.bulk import ScoredLabel, copy_labels

    name, sid = make_sae(conn, {0: ("Quokkas sunbathing", 0.1, {})})
    try:
        def explanation(label, failure=None):
            return Explanation(sae=name, index=1, label=label, failure=failure, explainer="openai:stub",
                               prompt_version="explain-v1")

        upsert_explanation(conn, sid, explanation(None, failure="error: timeout"))
        upsert_explanation(conn, sid, explanation("numbats foraging"))       # the failure replaced: an UPDATE
        copy_labels(conn, sid, [ScoredLabel(2, "wombat-burrows,\tdeep")])   # words added at the end of the load
        expect = {"quokkas", "sunbathing", "numbats", "foraging", "wombat", "burrows", "deep"}
        assert {w for (w,) in conn.execute("SELECT word FROM label_words WHERE word = ANY(%s)",
                                           (list(expect),))} == expect
        flt = store.Filters(sae_id=sid)
        assert arm_labels(conn, store.trigram_arm(conn, "numbat foragin", flt)) == ["numbats foraging"]
        assert arm_labels(conn, store.trigram_arm(conn, "wombat burows", flt)) == ["wombat-burrows,\tdeep"]
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_label_writers_adding_the_same_new_words_never_wait_for_each_other(conn):
    from interp.db import connect

    name, sid = make_sae(conn, {})
    first, second = connect(), connect()
    try:
        second.execute("SET lock_timeout = '2s'")
        with first.transaction(), second.transaction():
            # each holds the other's next new word uncommitted: with a unique key on the word, a deadlock
            for writer, feature, label in ((first, 0, "zorblax quuxite"), (second, 1, "quuxite frobnar"),
                                           (first, 2, "frobnar"), (second, 3, "zorblax")):
                upsert_explanation(writer, sid, Explanation(sae=name, index=feature, label=label,
                                                            explainer="openai:stub", prompt_version="explain-v1"))
        assert {w for (w,) in conn.execute("SELECT word FROM label_words WHERE word = ANY(%s)",
                                           (["zorblax", "quuxite", "frobnar"],))} == {"zorblax", "quuxite", "frobnar"}
    finally:
        first.close()
        second.close()
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_hybrid_search_finds_text_typo_and_synonym(conn, sae, index_dir):
    name = sae[0]
    assert labels_of(search(conn, "suspension bridge", sae=name, index_dir=index_dir))[0] == LABELS[0][0]
    assert labels_of(search(conn, "golden gat", sae=name, index_dir=index_dir))[0] == LABELS[0][0]
    # "car" shares no lexeme and no trigram with "automobiles and trucks": only the semantic arm can find it
    flt = store.Filters(sae_id=sae[1])
    text_hits = arm_labels(conn, store.fulltext_arm(conn, "car", flt) + store.trigram_arm(conn, "car", flt))
    assert LABELS[3][0] not in text_hits and LABELS[6][0] in text_hits     # "car" is a substring of "card"
    assert LABELS[3][0] in labels_of(search(conn, "car", sae=name, index_dir=index_dir)[:10])
    assert LABELS[1][0] in labels_of(search(conn, "feline", sae=name, index_dir=index_dir)[:10])
    assert LABELS[3][0] not in labels_of(search(conn, "car", sae=name, semantic=False))


def test_a_query_searched_again_is_not_embedded_again(conn, sae, index_dir, monkeypatch):
    from interp import label_index

    real, asked = label_index.embed, []
    monkeypatch.setattr(label_index, "embed", lambda texts, enc: asked.append(list(texts)) or real(texts, enc))
    query = f"motor vehicles {os.getpid()}"      # not one an earlier test embedded in this process
    first = search(conn, query, sae=sae[0], index_dir=index_dir)
    again = search(conn, query, sae=sae[0], density=":1", index_dir=index_dir)
    assert asked.count([query]) == 1
    assert LABELS[3][0] in labels_of(first) and labels_of(again) == labels_of(first)


def test_results_carry_scores_density_and_the_show_command(conn, sae, index_dir):
    top = search(conn, "golden gate bridge", sae=sae[0], index_dir=index_dir)[0]
    assert (top.sae, top.index, top.explainer) == (sae[0], 0, "openai:stub")
    assert top.scores == pytest.approx(LABELS[0][2])
    assert top.density == pytest.approx(0.001)
    assert top.show == f"interp feature {sae[0]} 0"


def test_equal_relevance_is_ordered_by_score(conn, index_dir):
    # two labels equal for every arm; the better scored one comes first whichever was stored first
    name, sid = make_sae(conn, {0: ("zebra crossings", 0.1, {"embedding": 0.2}),
                                1: ("zebra crossings", 0.1, {"embedding": 0.9})})
    try:
        hits = search(conn, "zebra crossings", sae=name, scorer="embedding", index_dir=index_dir, semantic=False)
        assert [h.index for h in hits] == [1, 0]
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_filters_apply_inside_every_arm(conn, sae, index_dir):
    name, sid = sae
    flt = store.Filters(sae_id=sid, scorer="detection", min_score=0.45, density_min=0.0, density_max=0.01)
    for arm in (store.fulltext_arm, store.trigram_arm):
        assert arm_labels(conn, arm(conn, "bridges", flt)) == []               # detection 0.4 < 0.45
    ok = store.Filters(sae_id=sid, scorer="detection", min_score=0.35)
    assert arm_labels(conn, store.trigram_arm(conn, "golden gat", ok)) == [LABELS[0][0]]
    hits = search(conn, "bridges", sae=name, min_score=0.5, semantic=False)
    assert labels_of(hits) == [LABELS[0][0]]                                   # card games' best score is 0.1
    hits = search(conn, "bridges", sae=name, density="0.0035:0.01", semantic=False)
    assert labels_of(hits) == [LABELS[6][0]]
    for h in search(conn, "bridges", sae=name, min_score=0.5, density=":0.01", index_dir=index_dir):
        assert max(h.scores.values()) >= 0.5 and h.density <= 0.01            # the semantic arm's hits too
    assert search(conn, "bridges", sae=name, scorer="detection", min_score=0.9, index_dir=index_dir) == []
    assert all(h.scores.get("detection", 0) >= 0.5
               for h in search(conn, "code", sae=name, scorer="detection", min_score=0.5, index_dir=index_dir))


def test_semantic_index_catches_up_and_rebuilds_from_postgres(conn, index_dir):
    from interp import label_index

    volcano = "volcanic eruptions and lava"
    name, sid = make_sae(conn, {0: (volcano, 0.1, {})})
    try:
        assert labels_of(search(conn, "magma", sae=name, index_dir=index_dir)) == [volcano]
        eid = upsert_explanation(conn, sid, Explanation(sae=name, index=1, label="thunderstorms and lightning",
                                                        explainer="openai:stub", prompt_version="explain-v1"))
        assert store.unembedded_labels(conn, 10_000)[-1][0] == eid                # stored, not yet embedded
        assert "thunderstorms and lightning" in labels_of(search(conn, "weather storm", sae=name,
                                                                 index_dir=index_dir))
        assert eid not in [r[0] for r in store.unembedded_labels(conn, 10_000)]
        meta = json.loads(label_index.meta_path(index_dir, store.catalog_uuid(conn)).read_text())
        for f in os.listdir(index_dir):                                          # lose the whole index
            os.remove(os.path.join(index_dir, f))
        assert labels_of(search(conn, "magma", sae=name, index_dir=index_dir)) == [volcano]
        meta2 = json.loads(label_index.meta_path(index_dir, store.catalog_uuid(conn)).read_text())
        assert meta2["seq"] >= meta["seq"]
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_without_the_index_search_says_so_once_and_uses_the_text_arms(conn, sae, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    notes = []
    hits = search(conn, "golden gat", sae=sae[0], index_dir=str(blocker / "index"), warn=notes.append)
    assert labels_of(hits)[0] == LABELS[0][0]
    assert len(notes) == 1 and "semantic search is off" in notes[0] and "\n" not in notes[0]


# ---------------------------------------------------------------- the CLI and bad input
@pytest.fixture
def cli(cli, monkeypatch, tmp_path):
    """conftest's in-process CLI runner, with an index folder of this test's own, as (code, stdout, stderr)."""
    monkeypatch.setenv("SEARCH_INDEX_DIR", str(tmp_path / "cli-index"))

    def run(*args):
        r = cli(*args)
        return r.returncode, r.stdout, r.stderr

    return run


def test_cli_json_shape_and_table(conn, sae, cli):
    code, out, err = cli("search", "golden gat", "--sae", sae[0], "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert list(doc) == ["results"]
    assert set(doc["results"][0]) == {"sae", "index", "label", "explainer", "scores", "density", "show"}
    assert doc["results"][0]["label"] == LABELS[0][0]
    code, out, _ = cli("search", "golden gat", "--sae", sae[0])
    assert code == 0 and "Golden" in out and "0.900" in out


BAD_QUERIES = ["'; DROP TABLE explanations; --", "\" OR 1=1 --", "%", "_", "%_%", "100%", "a_b",
               "!!!", "~~~ ^^^ ***", "\u2014\u2014", "\U0001F600", "a", "(((", "!cat & | <->", "\\", "'", ":*"]


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_hostile_queries_give_clean_results(conn, sae, cli, query):
    code, out, err = cli("search", query, "--sae", sae[0], "--json")
    assert code == 0, err
    assert "Traceback" not in err
    labels = [r["label"] for r in json.loads(out)["results"]]
    assert len(labels) < len(LABELS)                                 # no wildcard matched everything
    if query in ("%", "_", "%_%"):                                   # not LIKE wildcards; "%" means percent
        assert set(labels) <= {"percent signs in tables"}
    assert conn.execute("SELECT count(*) FROM explanations WHERE sae_id = %s", (sae[1],)).fetchone()[0] == len(LABELS)


@pytest.mark.parametrize("args,expect", [
    (("",), "empty"),
    ((" \t ",), "empty"),
    (("x" * 10_000,), "at most 1,000"),
    (("bridge", "--sae", "no-such-sae"), "known:"),
    (("bridge", "--scorer", "vibes"), "known: simulation, detection, fuzzing, embedding"),
    (("bridge", "--density", "high"), "--density"),
    (("bridge", "--limit", "0"), "--limit"),
])
def test_bad_input_is_one_line(conn, sae, cli, args, expect):
    code, out, err = cli("search", *args, "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err


def test_bulk_copy_round_trips_awkward_text_and_scores(conn):
    from interp.store.bulk import ScoredLabel, copy_labels

    awkward = 'tab\there, back\\slash, "quotes", {braces,commas}\nnew line \u00e9\u6f22'
    name, sid = make_sae(conn, {})
    try:
        n = copy_labels(conn, sid, [ScoredLabel(0, awkward, scores={"embedding": 0.25, 'odd "name",': 0.5}),
                                    ScoredLabel(1, "plain", scores={})])
        assert n == 2
        hits = {h.index: h for h in store.label_hits(conn, [i for i, _ in store.trigram_arm(
            conn, "back slash quotes", store.Filters(sae_id=sid))])}
        assert hits[0].label == awkward and hits[0].scores == {"embedding": 0.25, 'odd "name",': 0.5}
        assert copy_labels(conn, sid, [ScoredLabel(0, "other", scores={"embedding": 0.9})]) == 1
        again = store.label_hits(conn, [hits[0].id])[0]
        assert again.label == awkward and again.scores["embedding"] == 0.25     # a stored label is kept
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_bulk_copy_in_chunks_is_one_transaction_and_a_repeated_key_scores_once(conn, monkeypatch):
    from interp.store import bulk
    from interp.store.bulk import ScoredLabel, copy_labels

    monkeypatch.setattr(bulk, "LABEL_CHUNK", 2)             # several COPY + INSERT rounds on the writer thread
    name, sid = make_sae(conn, {})
    try:
        rows = [ScoredLabel(i, f"label {i}", scores={"embedding": i / 10}) for i in range(5)]
        rows.append(ScoredLabel(1, "label 1 again", scores={"embedding": 0.99}))     # same key: the first is kept
        assert copy_labels(conn, sid, rows) == 6
        stored = conn.execute("SELECT e.feature, e.label, s.value FROM explanations e JOIN scores s"
                              " ON s.explanation_id = e.id WHERE e.sae_id = %s ORDER BY 1", (sid,)).fetchall()
        assert [(f, label) for f, label, _ in stored] == [(i, f"label {i}") for i in range(5)]
        assert [round(v, 2) for _, _, v in stored] == [0.0, 0.1, 0.2, 0.3, 0.4]

        def failing():
            yield from (ScoredLabel(i, f"more {i}") for i in range(10, 15))
            raise RuntimeError("the source broke")

        with pytest.raises(RuntimeError, match="the source broke"):
            copy_labels(conn, sid, failing())
        count = conn.execute("SELECT count(*) FROM explanations WHERE sae_id = %s", (sid,)).fetchone()[0]
        assert count == 5                                    # nothing of the failed load was kept
        with pytest.raises(InputError, match=f"no SAE with id {sid + 10_000}"):
            copy_labels(conn, sid + 10_000, rows)            # the writer's error reaches the caller
        bulk.vacuum_labels(conn)
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_each_score_stores_its_own_values_and_per_example_breakdown(conn):
    from interp.records import ExampleScore
    from interp.store.labels import upsert_scores

    name, sid = make_sae(conn, {})
    try:
        ids = [upsert_explanation(conn, sid, Explanation(sae=name, index=i, label=f"label {i}", explainer="x",
                                                         prompt_version="v")) for i in range(3)]
        scores = [Score(sae=name, index=i, scorer=scorer, simulator="stub", prompt_version="s1", label=f"label {i}",
                        method="json", value=0.1 * i, values={"accuracy": 0.5 + i, "f1": None},
                        breakdown=[ExampleScore(example=j, kind="top", true=[1.0, float(i)], predicted=1.0 * j,
                                                probability=None) for j in range(i + 1)])
                  for i in range(3) for scorer in ("detection", "fuzzing")]
        upsert_scores(conn, [(ids[s.index], s) for s in scores])
        stored = {(f, scorer): d for f, scorer, d in conn.execute(
            "SELECT e.feature, s.scorer, s.details FROM scores s JOIN explanations e ON e.id = s.explanation_id"
            " WHERE e.sae_id = %s", (sid,))}
        assert len(stored) == 6
        for s in scores:
            assert stored[s.index, s.scorer] == {"values": s.values,
                                                 "breakdown": [b.model_dump() for b in s.breakdown]}
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_deleting_an_sae_deletes_its_labels_and_scores_and_a_gone_sae_takes_no_labels(conn):
    """explanations have no per-row key to saes (migration 008): the delete trigger and lock_sae stand in."""
    (a, sa), (b, sb) = (make_sae(conn, {i: (f"label {i}", 0.5, {"embedding": 0.5}) for i in range(3)})
                        for _ in range(2))
    conn.execute("DELETE FROM saes WHERE id = %s", (sa,))
    left = dict(conn.execute("SELECT e.sae_id, count(s.id) FROM explanations e LEFT JOIN scores s"
                             " ON s.explanation_id = e.id WHERE e.sae_id = ANY(%s) GROUP BY 1", ([sa, sb],)))
    assert left == {sb: 3}
    with pytest.raises(InputError, match=f"no SAE with id {sa}"):
        upsert_explanation(conn, sa, Explanation(sae=a, index=0, label="late", explainer="x", prompt_version="v"))
    assert conn.execute("SELECT count(*) FROM explanations WHERE sae_id = %s", (sa,)).fetchone()[0] == 0
    conn.execute("DELETE FROM saes WHERE id = %s", (sb,))


def test_a_backlog_of_unembedded_labels_is_said_once_and_worked_off(conn, index_dir, monkeypatch):
    from interp import label_index

    monkeypatch.setattr(label_index, "EMBED_PER_SEARCH", 1)
    name, sid = make_sae(conn, {0: ("glaciers and ice sheets", 0.1, {}), 1: ("deserts and dunes", 0.1, {})})
    try:
        backlog = len(store.unembedded_labels(conn, 100_000))
        assert backlog >= 2
        notes = []
        search(conn, "sand", sae=name, index_dir=index_dir, warn=notes.append)
        assert len(notes) == 1 and "wait for embeddings" in notes[0]
        assert len(store.unembedded_labels(conn, 100_000)) == backlog - 1        # one embedded per search
        label_index.embed_pending(conn, label_index.load_encoder(), backlog)
        notes.clear()
        hits = search(conn, "sand", sae=name, index_dir=index_dir, warn=notes.append)
        assert notes == [] and "deserts and dunes" in labels_of(hits)
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def test_a_corrupt_index_file_is_rebuilt_from_postgres(conn, index_dir):
    from interp import label_index

    name, sid = make_sae(conn, {0: ("volcanic eruptions and lava", 0.1, {})})
    try:
        assert labels_of(search(conn, "magma", sae=name, index_dir=index_dir)) == ["volcanic eruptions and lava"]
        meta = json.loads(label_index.meta_path(index_dir, store.catalog_uuid(conn)).read_text())
        with open(os.path.join(index_dir, meta["file"]), "wb") as fh:
            fh.write(b"not an index")
        label_index._OPEN.clear()                                   # a new process: nothing open yet
        notes = []
        hits = search(conn, "magma", sae=name, index_dir=index_dir, warn=notes.append)
        assert labels_of(hits) == ["volcanic eruptions and lava"] and notes == []
    finally:
        conn.execute("DELETE FROM saes WHERE id = %s", (sid,))


def scores_key(conn):
    return conn.execute("SELECT oid, convalidated FROM pg_constraint WHERE contype = 'f'"
                        " AND conrelid = 'scores'::regclass AND confrelid = 'explanations'::regclass").fetchall()


def test_a_load_into_an_empty_catalog_checks_the_scores_key_once_at_the_end(fresh_db):
    from interp.db import connect, migrate
    from interp.store.bulk import ScoredLabel, copy_labels

    with connect(fresh_db) as conn:
        migrate(conn)
        sid = create_sae(conn, "empty", SAEMeta(model="m", layer=0, site="resid", d_in=1, n_features=9, arch="topk"))
        before = scores_key(conn)

        def failing():
            yield ScoredLabel(0, "first", scores={"embedding": 0.5})
            raise RuntimeError("the source broke")

        with pytest.raises(RuntimeError, match="the source broke"):
            copy_labels(conn, sid, failing())
        assert scores_key(conn) == before                   # dropped and rolled back with the load
        assert copy_labels(conn, sid, [ScoredLabel(i, f"label {i}", scores={"embedding": i / 10, "detection": 0.5})
                                       for i in range(3)]) == 3
        after = scores_key(conn)
        assert len(after) == 1 and after[0][1] and after[0][0] != before[0][0]     # added back, checked
        assert conn.execute("SELECT count(*) FROM scores").fetchone()[0] == 6
        copy_labels(conn, sid, [ScoredLabel(5, "into a catalog in use", scores={"embedding": 0.1})])
        assert scores_key(conn) == after                    # not empty: the key stayed and checked each row
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO scores (explanation_id, scorer, simulator) VALUES (-1, 'x', 'y')")
