"""Planted features over the builtin corpus, harvested and stored by the production path (HarvestState ->
catalog -> load_feature_examples), guard the whole chain against silent breakage: a correct label must score
clearly above a label shuffled from another feature, the baseline explainer must find the planted tokens,
and `interp feature --json` must feed `interp explain` as it is."""
import json

import pytest

from interp.explainers import BaselineExplainer
from interp.scorers import embedding, score_set
from tests.planted import RULES, contexts, harvest_state, planted_catalog, planted_features, shuffled_labels

# measured (bench/label_quality.py, real-path records): correct 0.66, baseline 0.65, shuffled 0.44 mean
# embedding AUROC; the margins leave room for small changes of the harvest's sampling
MARGIN_CORRECT = 0.15
MARGIN_BASELINE = 0.10


@pytest.fixture(scope="module")
def planted(conn):
    with planted_catalog(conn) as p:
        yield p


@pytest.fixture(scope="module")
def baseline_labels(planted):
    return [BaselineExplainer().explain_sync(fe) for fe in planted.features]


def test_planted_records_have_the_harvest_layout_and_are_held_out_by_text(planted):
    for rule, fe in zip(planted.rules, planted.features):
        # the layout the harvest writes: quantile samples for the explainer only, random negatives on both sides
        assert {e.kind for e in fe.split("score")} == {"top", "random"}, rule.name
        assert {e.kind for e in fe.split("explain")} == {"top", "quantile", "random"}, rule.name
        held = score_set(fe)
        assert held.leaked == 0 and len(held.examples) == 20, rule.name
        assert all(e.max_act == 0 for e in fe.examples if e.kind == "random")
        assert all(e.tokens and len(e.tokens) == len(e.token_ids) for e in fe.examples)   # decoded from the vocab


def test_records_without_the_catalog_equal_the_catalog_ones(planted):
    for (rule, direct), stored in zip(planted_features(), planted.features):
        assert [(e.kind, e.split, e.quantile_bin, e.token_ids, e.tokens) for e in direct.examples] == \
               [(e.kind, e.split, e.quantile_bin, e.token_ids, e.tokens) for e in stored.examples], rule.name
        for a, b in zip(direct.examples, stored.examples):
            assert a.acts == pytest.approx(b.acts, abs=1e-6)
        assert direct.max_act == pytest.approx(stored.max_act)


def test_planted_duplicates_are_dropped_so_no_text_is_in_both_splits():
    ctxs = contexts(600)
    ctxs += ctxs[:150]                  # a corpus that repeats a quarter of itself
    vocab = {t: i for i, t in enumerate(sorted({t for c in ctxs for t in c}))}
    state = harvest_state(ctxs, vocab, RULES)
    res = state.result()
    assert state.duplicates_dropped > 0
    kept = {int(c) for c in res.examples.ctx}
    assert not any(c - 600 in kept for c in kept if c >= 600)     # of a context and its copy, one is used
    for i in range(len(RULES)):
        fe = res.feature_examples(i)
        explain = {tuple(e.token_ids) for e in fe.split("explain")}
        assert not explain & {tuple(e.token_ids) for e in fe.split("score")}, RULES[i].name


def test_embedding_scores_correct_labels_clearly_above_shuffled(planted):
    correct = [embedding(fe, rule.label).value for rule, fe in zip(planted.rules, planted.features)]
    shuffled = [embedding(fe, lab).value for fe, lab in zip(planted.features, shuffled_labels(planted.rules))]
    mean_c, mean_s = sum(correct) / len(correct), sum(shuffled) / len(shuffled)
    assert mean_c - mean_s >= MARGIN_CORRECT, (correct, shuffled)
    assert sum(c > s for c, s in zip(correct, shuffled)) >= 6


def test_baseline_labels_score_above_shuffled(planted, baseline_labels):
    base = [embedding(fe, ex.label).value for fe, ex in zip(planted.features, baseline_labels)]
    shuffled = [embedding(fe, lab).value for fe, lab in zip(planted.features, shuffled_labels(planted.rules))]
    assert sum(base) / len(base) - sum(shuffled) / len(shuffled) >= MARGIN_BASELINE, (base, shuffled)


def test_baseline_finds_the_planted_tokens(planted, baseline_labels):
    by_name = {rule.name: ex for rule, ex in zip(planted.rules, baseline_labels)}
    assert all(ex.is_baseline and ex.label for ex in baseline_labels)
    for name, token in [("def", '"def"'), ("self", '"self"'), ("return", '"return"'), ("import", '"import"'),
                        ("comment", '"#"')]:
        assert token in by_name[name].label, by_name[name].label
    assert by_name["digits"].label.startswith("digit tokens")
    assert by_name["capitalised"].label.startswith("capitalised words")
    assert len(RULES) == len(planted.features) == 8


def test_feature_json_feeds_explain_as_it_is(planted, baseline_labels, cli, tmp_path):
    r = cli("feature", planted.name, "1", "--json")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "feature.json"
    path.write_text(r.stdout)
    r = cli("explain", str(path), "--explainer", "baseline", "--scorer", "embedding", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["explanation"]["label"] == baseline_labels[1].label
    assert out["scores"][0]["value"] == pytest.approx(embedding(planted.features[1], baseline_labels[1].label).value)
