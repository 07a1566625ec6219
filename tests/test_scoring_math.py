"""Known answers for the scoring math, including the undefined cases."""
import math

import pytest

from interp.scoring import auroc, classification_scores, expected_value, normalise_activations, simulation_scores


def test_normalisation_floors_clips_and_relus():
    assert normalise_activations([-1.0, 0.0, 0.99, 1.0, 2.5, 5.0, 7.0], 5.0) == [0, 0, 1, 2, 5, 10, 10]
    assert normalise_activations([1.0, 2.0], 0.0) == [0, 0]


def test_expected_value_renormalises_only_digit_entries():
    # "x" is ignored; "2" and "10" with p 0.25/0.75 after renormalisation -> 8.0
    lp = {"2": math.log(0.1), "10": math.log(0.3), "x": math.log(0.6)}
    assert expected_value(lp) == pytest.approx(0.25 * 2 + 0.75 * 10)
    assert expected_value({" 3": 0.0}) == pytest.approx(3.0)
    assert expected_value({"a": -0.1, "11": -0.2}) is None


def test_simulation_scores_known_answer_over_concatenated_sequences():
    t = [[0.0, 2.0], [4.0, 0.0, 2.0]]
    e = [[1.0, 2.0], [3.0, 1.0, 3.0]]
    s = simulation_scores(t, e)
    # by hand: t = [0,2,4,0,2], e = [1,2,3,1,3]; means 1.6 and 2.0
    # cov = (-1.6)(-1) + 0.4*0 + 2.4*1 + (-1.6)(-1) + 0.4*1 = 6.0
    # var_t = 2.56+0.16+5.76+2.56+0.16 = 11.2, var_e = 1+0+1+1+1 = 4
    assert s["ev_correlation_score"] == pytest.approx(6.0 / math.sqrt(11.2 * 4.0))
    # mean((t-e)^2) = (1+0+1+1+1)/5 = 0.8; mean(t^2) = (0+4+16+0+4)/5 = 4.8
    assert s["rsquared_score"] == pytest.approx(1 - 0.8 / 4.8)
    # mean|t-e| = 4/5 = 0.8; mean|t| = 8/5 = 1.6
    assert s["absolute_dev_explained_score"] == pytest.approx(0.5)


def test_concatenation_differs_from_mean_of_per_sequence_correlations():
    t = [[0.0, 1.0], [10.0, 11.0]]
    e = [[1.0, 0.0], [11.0, 10.0]]
    # each sequence alone correlates -1; together the between-sequence spread dominates
    assert simulation_scores(t, e)["ev_correlation_score"] > 0.9


def test_undefined_cases_are_none():
    flat_pred = simulation_scores([[0.0, 1.0, 2.0]], [[5.0, 5.0, 5.0]])
    assert flat_pred["ev_correlation_score"] is None
    assert flat_pred["rsquared_score"] is not None
    all_zero = simulation_scores([[0.0, 0.0]], [[1.0, 2.0]])
    assert all_zero == {"ev_correlation_score": None, "rsquared_score": None, "absolute_dev_explained_score": None}
    assert simulation_scores([], [])["ev_correlation_score"] is None
    with pytest.raises(ValueError):
        simulation_scores([[1.0, 2.0]], [[1.0]])


def test_perfect_and_inverse_prediction():
    t = [[0.0, 3.0, 6.0]]
    assert simulation_scores(t, t) == {"ev_correlation_score": pytest.approx(1.0), "rsquared_score": 1.0,
                                       "absolute_dev_explained_score": 1.0}
    assert simulation_scores(t, [[6.0, 3.0, 0.0]])["ev_correlation_score"] == pytest.approx(-1.0)


def test_auroc_known_answers_with_ties_and_one_class():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # pairs: (0.8>0.5) (0.8>0.8 tie=.5) (0.3<0.5) (0.3<0.8) -> 1.5/4
    assert auroc([1, 0, 1, 0], [0.8, 0.5, 0.3, 0.8]) == pytest.approx(0.375)
    assert auroc([1, 1], [0.3, 0.4]) is None


def test_classification_scores_known_answer_and_undefined():
    s = classification_scores([1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0.9, 0.8, 0.4, 0.6, 0.1])
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["auroc"] == pytest.approx(5 / 6)
    none_predicted = classification_scores([1, 0], [0, 0])
    assert none_predicted["precision"] is None and none_predicted["auroc"] is None
    assert none_predicted["balanced_accuracy"] == 0.5
