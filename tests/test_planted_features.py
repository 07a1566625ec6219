"""Planted features over the builtin corpus guard the whole chain (harvest-shaped records -> explainer ->
offline scorer) against silent breakage: a correct label must score clearly above a label shuffled from
another feature, and the baseline explainer must find the planted tokens."""
import pytest

from interp.explainers import BaselineExplainer
from interp.scorers import embedding, score_set
from tests.planted import RULES, planted_features, shuffled_labels

# measured (bench/label_quality.py): correct ~0.80, baseline ~0.71, shuffled ~0.35 mean embedding AUROC
MARGIN_CORRECT = 0.30
MARGIN_BASELINE = 0.20


@pytest.fixture(scope="module")
def planted():
    return planted_features()


@pytest.fixture(scope="module")
def baseline_labels(planted):
    return [BaselineExplainer().explain_sync(fe) for _, fe in planted]


def test_planted_records_are_harvest_shaped_and_held_out(planted):
    for rule, fe in planted:
        kinds = {e.kind for e in fe.split("score")}
        assert kinds == {"top", "quantile", "random"}, rule.name
        assert len(score_set(fe)) >= 12                      # disjoint from the explain split
        assert all(e.max_act == 0 for e in fe.examples if e.kind == "random")


def test_embedding_scores_correct_labels_clearly_above_shuffled(planted):
    correct = [embedding(fe, rule.label).value for rule, fe in planted]
    shuffled = [embedding(fe, lab).value for (_, fe), lab in zip(planted, shuffled_labels([r for r, _ in planted]))]
    mean_c, mean_s = sum(correct) / len(correct), sum(shuffled) / len(shuffled)
    assert mean_c - mean_s >= MARGIN_CORRECT, (correct, shuffled)
    assert sum(c > s for c, s in zip(correct, shuffled)) >= 6


def test_baseline_labels_score_above_shuffled(planted, baseline_labels):
    base = [embedding(fe, ex.label).value for (_, fe), ex in zip(planted, baseline_labels)]
    shuffled = [embedding(fe, lab).value for (_, fe), lab in zip(planted, shuffled_labels([r for r, _ in planted]))]
    assert sum(base) / len(base) - sum(shuffled) / len(shuffled) >= MARGIN_BASELINE, (base, shuffled)


def test_baseline_finds_the_planted_tokens(planted, baseline_labels):
    by_name = {rule.name: ex for (rule, _), ex in zip(planted, baseline_labels)}
    assert all(ex.is_baseline and ex.label for ex in baseline_labels)
    for name, token in [("def", '"def"'), ("self", '"self"'), ("return", '"return"'), ("import", '"import"'),
                        ("comment", '"#"')]:
        assert token in by_name[name].label, by_name[name].label
    assert by_name["digits"].label.startswith("digit tokens")
    assert by_name["capitalised"].label.startswith("capitalised words")
    assert len(RULES) == len(planted) == 8
