"""Reading a simulator's answer: logprob expected values aligned to tokens by name; the JSON fallback."""
import math

import pytest

from interp.llm import Completion, TokenLogprob
from interp.records import Usage
from interp.simulator import values_from_json, values_from_logprobs


def completion(pieces):
    """pieces: (token, top_logprobs or None)"""
    return Completion(text="".join(t for t, _ in pieces), usage=Usage(),
                      logprobs=[TokenLogprob(t, 0.0, top or {t: 0.0}) for t, top in pieces])


def test_values_come_from_top_logprobs_and_align_by_token_name():
    half = {"2": math.log(0.5), "4": math.log(0.5), "x": -1.0}
    c = completion([("a", None), ("\t", None), ("2", half), ("\n", None),
                    ("X", None), ("\t", None), ("9", {"9": 0.0}), ("\n", None),     # invented line: skipped
                    (" c", None), ("\t", None), ("7", {"7": 0.0, "8": -30.0})])
    vals, missing = values_from_logprobs(c, ["a", " b", " c"])
    assert vals == pytest.approx([3.0, 0.0, 7.0]) and missing == 1     # " b" dropped by the simulator


def test_a_token_fused_with_the_tab_still_reads_its_logprobs():
    c = completion([(" x", None), ("\t5", {"\t5": math.log(0.5), "\t6": math.log(0.5), "x": -1.0})])
    vals, missing = values_from_logprobs(c, [" x"])
    assert vals == pytest.approx([5.5]) and missing == 0


def test_unparseable_answers_are_all_missing():
    vals, missing = values_from_logprobs(completion([("The", None), (" answer", None)]), ["a", "b"])
    assert vals == [0.0, 0.0] and missing == 2


def test_json_values_are_clipped_padded_and_counted():
    assert values_from_json('ok {"activations": [3, 12, -1]}', 4) == ([3.0, 10.0, 0.0, 0.0], 1)
    with pytest.raises(ValueError, match="no JSON object"):
        values_from_json("nothing", 2)
    with pytest.raises(ValueError, match='no "activations" list'):
        values_from_json('{"values": [1]}', 1)


def test_answer_grammar_fixes_every_line_and_escapes_the_corpus():
    from interp.simulator import answer_grammar

    g = answer_grammar(["def", ' "x"', "a\\b", "\x01"])
    root, v = g.strip().split("\n")
    assert v == 'v ::= "10" | [0-9]'
    # one literal per token line, in order, each followed by a value and a newline
    assert root == r'root ::= "def\x09" v "\x0A" " \"x\"\x09" v "\x0A" "a\\b\x09" v "\x0A" "\x01\x09" v "\x0A"'
