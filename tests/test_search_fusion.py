"""Pure parts of search: reciprocal rank fusion, the --density parser, the query cleaner and the trigram arm's
word lookup."""
import pytest

from interp.search import MAX_QUERY_CHARS, RRF_K, clean_query, parse_density, ranks, rrf
from interp.store.search import MAX_QUERY_WORDS, QueryWord, word_tsquery
from sae.errors import InputError


def positions(*keys):
    return {k: r for r, k in enumerate(keys, start=1)}


def test_rrf_sums_one_over_k_plus_rank_across_arms():
    # 10: rank 1 in arm one, rank 2 in arm two -> 1/61 + 1/62; 20: rank 2 and rank 1 -> the same sum;
    # 30: rank 3 in arm one only -> 1/63; 40: rank 1 in arm three only -> 1/61
    fused = rrf([positions(10, 20, 30), positions(20, 10), positions(40)])
    assert fused[10] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[20] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[30] == pytest.approx(1 / 63)
    assert fused[40] == pytest.approx(1 / 61)
    assert RRF_K == 60


def test_rrf_rewards_agreement_over_one_high_rank():
    # rank 5 in two arms (2/65 = 0.0308) beats rank 1 in one arm (1/61 = 0.0164)
    fused = rrf([positions(1, 2, 3, 4, 5), positions(6, 7, 8, 9, 5), positions(1)])
    assert fused[5] > fused[2]
    assert fused[1] == pytest.approx(2 / 61)
    assert max(fused, key=fused.get) == 1


def test_rrf_of_nothing_is_empty_and_k_is_a_parameter():
    assert rrf([]) == {}
    assert rrf([{}, {}]) == {}
    assert rrf([{7: 1}], k=0) == {7: 1.0}


def test_ties_share_the_mean_of_their_positions():
    # relevance 0.9, 0.5, 0.5, 0.1 -> positions 1, 2-3, 4 -> ranks 1, 2.5, 2.5, 4
    assert ranks([(1, 0.9), (2, 0.5), (3, 0.5), (4, 0.1)]) == {1: 1, 2: 2.5, 3: 2.5, 4: 4}
    assert ranks([(1, 0.5), (2, 0.5), (3, 0.5)]) == {1: 2, 2: 2, 3: 2}
    fused = rrf([ranks([(1, 0.9), (2, 0.5), (3, 0.5)])])
    assert fused[2] == fused[3] == pytest.approx(1 / 62.5)
    assert ranks([]) == {}


def test_many_ties_in_one_arm_do_not_crowd_out_another_arms_first():
    # 100 labels tied in arm A (ranks 50.5) against one clear first in arm B (rank 1): B's first wins
    tied = ranks([(k, 0.75) for k in range(100)])
    fused = rrf([tied, ranks([(500, 0.6)])])
    assert max(fused, key=fused.get) == 500
    assert fused[0] == pytest.approx(1 / 110.5)


def test_parse_density_open_and_closed_bounds():
    assert parse_density(None) == (None, None)
    assert parse_density("0.001:0.05") == (0.001, 0.05)
    assert parse_density(":0.5") == (None, 0.5)
    assert parse_density("0.1:") == (0.1, None)
    for bad in ("0.1", "a:b", "0.5:0.1", "1:2:3"):
        with pytest.raises(InputError):
            parse_density(bad)


def test_clean_query_collapses_space_drops_nul_and_bounds_length():
    assert clean_query("  golden \t gat\n") == "golden gat"
    assert clean_query("cat\x00s") == "cat s"
    for empty in ("", "   ", "\x00"):
        with pytest.raises(InputError, match="empty"):
            clean_query(empty)
    assert clean_query("a" * MAX_QUERY_CHARS) == "a" * MAX_QUERY_CHARS
    with pytest.raises(InputError, match="at most"):
        clean_query("a" * 10_000)


def test_only_candidates_that_can_reach_the_limit_are_read_back():
    from interp.search import contenders

    fused = {1: 0.9, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.1}
    # the 2nd-best value is 0.5, shared by three: all three stay, the score decides between them
    assert sorted(contenders(fused, 2)) == [1, 2, 3, 4]
    assert sorted(contenders(fused, 1)) == [1]
    assert sorted(contenders(fused, 5)) == [1, 2, 3, 4, 5]
    assert sorted(contenders(fused, 20)) == [1, 2, 3, 4, 5]


def test_a_heavy_enough_word_alone_finds_candidates():
    golden, gat = QueryWord(7, ("golden",)), QueryWord(4, ("gat", "gate"))
    assert word_tsquery(6.0, [golden, gat]) == "(('golden'))"              # "gat" alone carries too little
    assert word_tsquery(9.0, [golden, gat]) == "(('golden') & ('gat' | 'gate'))"
    assert word_tsquery(12.0, [golden, gat]) is None                      # no label can reach the threshold


def test_only_minimal_sets_of_words_are_spelled_out():
    words = [QueryWord(5, ("a",)), QueryWord(4, ("b",)), QueryWord(3, ("c",))]
    assert word_tsquery(7.0, words) == "(('a') & ('b')) | (('a') & ('c')) | (('b') & ('c'))"


def test_a_word_without_similar_label_words_carries_nothing():
    stop, bin_ = QueryWord(4, ()), QueryWord(4, ("bin", "binari"))
    assert word_tsquery(4.8, [stop, bin_]) is None
    assert word_tsquery(4.0, [stop, bin_]) == "(('bin' | 'binari'))"


def test_beyond_the_heaviest_words_the_rest_count_as_present():
    words = [QueryWord(2, (f"w{i}",)) for i in range(MAX_QUERY_WORDS)] + [QueryWord(1, ("light",))]
    tsq = word_tsquery(2.0 * MAX_QUERY_WORDS - 1, words)  # with the light word assumed, any five heavy ones
    assert tsq.count(" | (") == MAX_QUERY_WORDS - 1 and "light" not in tsq


def test_lexemes_are_quoted_for_tsquery():
    assert word_tsquery(1.0, [QueryWord(1, ("it's", "back\\slash"))]) == "(('it''s' | 'back\\\\slash'))"
