"""The semantic arm's index without services: isolated labels are kept beside the HNSW graph and found exactly."""
import numpy as np
import pytest

from interp import label_index as li

pytest.importorskip("usearch")
D = 32


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def topic_and_loner(n=2000, seed=0):
    """n labels about one topic (around axis 0), and one label (the last) about another (axis 1)."""
    rng = np.random.default_rng(seed)
    cluster = unit(np.eye(D)[0] + 0.15 * rng.normal(size=(n, D)))
    loner = unit(np.eye(D)[1] + 0.05 * rng.normal(size=D))
    return np.vstack([cluster, loner]).astype(np.float16), np.arange(n + 1, dtype=np.uint64)


def test_labels_with_no_near_neighbour_go_to_the_exact_side_index():
    vecs, ids = topic_and_loner()
    index = li._new_index(D)
    li._add(index, ids, vecs)
    assert len(index.graph) == len(ids)
    assert [int(k) for k in index.isolated.keys] == [len(ids) - 1]


def test_nearest_finds_an_isolated_label_the_graph_cannot_reach():
    vecs, ids = topic_and_loner()
    index = li._new_index(D)
    index.graph.add(ids[:-1], vecs[:-1])            # the walk's worst case: no edge leads to the loner at all
    index.isolated.add(ids[-1:], vecs[-1:])
    query = unit(np.eye(D)[0] + 2.0 * np.eye(D)[1])  # nearer the loner than any label of the topic
    exact = vecs.astype(np.float32) @ query
    assert exact.argmax() == len(ids) - 1
    near = li.nearest(index, query, 10, min_similarity=0.0)
    assert near[0][0] == len(ids) - 1 and near[0][1] == pytest.approx(exact.max(), abs=1e-3)
    assert len(near) == 10 and [s for _, s in near] == sorted((s for _, s in near), reverse=True)
    assert li.nearest(index, query, 10, min_similarity=0.95) == []


def test_the_side_index_is_saved_and_restored_with_the_graph(tmp_path):
    vecs, ids = topic_and_loner(n=500)
    index = li._new_index(D)
    li._add(index, ids, vecs)
    path = tmp_path / "labels-cat.json"
    li._save(index, path, {"catalog": "cat", "seq": 7, "model": li.EMBED_MODEL}, None)
    restored = li._restore(tmp_path / "labels-cat-7.usearch", view=True)
    assert len(restored) == len(ids) and [int(k) for k in restored.isolated.keys] == [len(ids) - 1]
    li._save(li._new_index(D), path, {"catalog": "cat", "seq": 9, "model": li.EMBED_MODEL},
             {"file": "labels-cat-7.usearch"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "labels-cat-9.isolated.usearch", "labels-cat-9.usearch", "labels-cat.json"]
    (tmp_path / "labels-cat-9.isolated.usearch").unlink()
    assert li._restore(tmp_path / "labels-cat-9.usearch", view=True) is None     # rebuilt from Postgres then


def test_a_query_is_embedded_as_the_sentence_transformer_encodes_it():
    enc = li.load_encoder()
    assert li._mean_pooled(enc) is not None                     # MiniLM takes the lean path
    texts = ["car", "golden gate bridge in san francisco", "x" * 3000]      # the last one is truncated
    want = enc.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = li.embed(texts, enc)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_catalog_of_one_two_or_three_labels_counts_only_the_labels_it_has():
    rng = np.random.default_rng(1)
    one_by_one = li._new_index(D)
    for i in range(3):                                  # a new catalog, one label per search
        li._add(one_by_one, np.array([i + 1], dtype=np.uint64), unit(rng.normal(size=(1, D))).astype(np.float16))
    assert len(one_by_one) == 3 and len(one_by_one.isolated) == 3
    twins = li._new_index(D)                            # a batch of two equal labels: each has one other, not two
    li._add(twins, np.array([1, 2], dtype=np.uint64), np.repeat(unit(rng.normal(size=(1, D))), 2, 0).astype(np.float16))
    assert sorted(int(k) for k in twins.isolated.keys) == [1, 2]
    trio = li._new_index(D)                             # three near-equal labels: each has two others close by
    base = unit(rng.normal(size=(1, D)))
    li._add(trio, np.array([1, 2, 3], dtype=np.uint64),
            unit(base + 0.01 * rng.normal(size=(3, D))).astype(np.float16))
    assert len(trio.isolated) == 0
