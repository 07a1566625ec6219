"""Reading a simulator's answer: logprob expected values aligned to tokens by name; the JSON fallback."""
import asyncio
import math

import pytest

from interp.llm import Completion, OpenAIClient, TokenLogprob
from interp.records import Usage
from interp.simulator import Simulator, values_from_json, values_from_logprobs
from tests.stub_llm import Reply, StubLLM


def completion(pieces):
    """pieces: (token, top_logprobs or None)"""
    return Completion(text="".join(t for t, _ in pieces), usage=Usage(),
                      logprobs=[TokenLogprob(t, 0.0, top or {t: 0.0}) for t, top in pieces])


def test_values_come_from_top_logprobs_and_align_by_token_name():
    half = {"2": math.log(0.5), "4": math.log(0.5), "x": -1.0}
    c = completion([("a", None), ("\t", None), ("2", half), ("\n", None),
                    ("X", None), ("\t", None), ("9", {"9": 0.0}), ("\n", None),     # invented line: skipped
                    (" c", None), ("\t", None), ("7", {"7": 0.0, "8": -30.0})])
    p = values_from_logprobs(c, ["a", " b", " c"])
    assert p.values == pytest.approx([3.0, 0.0, 7.0]) and p.missing == 1     # " b" dropped by the simulator
    assert p.sampled == 0


def test_a_token_fused_with_the_tab_still_reads_its_logprobs():
    c = completion([(" x", None), ("\t5", {"\t5": math.log(0.5), "\t6": math.log(0.5), "x": -1.0})])
    p = values_from_logprobs(c, [" x"])
    assert p.values == pytest.approx([5.5]) and p.missing == 0


def test_unparseable_answers_are_all_missing():
    p = values_from_logprobs(completion([("The", None), (" answer", None)]), ["a", "b"])
    assert p.values == [0.0, 0.0] and p.missing == 2 and p.sampled == 0


def test_json_values_are_clipped_padded_and_counted():
    p = values_from_json('ok {"activations": [3, 12, -1]}', 4)
    assert (p.values, p.missing) == ([3.0, 10.0, 0.0, 0.0], 1)
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


def test_a_bad_json_entry_is_missing_in_its_own_place():
    # [0, null, 9] used to become [0, 9, 0]: every value after the bad one moved a token left
    p = values_from_json('{"activations": [0, null, 9]}', 3)
    assert p.values == [0.0, 0.0, 9.0] and p.missing == 1
    p = values_from_json('{"activations": ["x", 4, true, 7.5]}', 4)
    assert p.values == [0.0, 4.0, 0.0, 7.5] and p.missing == 2


def split_digit_stub(answer: str, tops: dict[int, dict[str, float]]):
    """A stub endpoint whose tokenizer writes every digit as its own token (as SmolLM2's does): "a\t10\n" is
    "a", "\t", "1", "0", "\n"; `tops` gives the top_logprobs by token index."""
    stub = StubLLM()
    stub.responder = lambda body: Reply(answer, tops)
    return stub


def simulate(stub, tokens):
    async def go():
        client = OpenAIClient(model="sim", base_url=stub.url, api_key="k", timeout_s=5, max_retries=0)
        try:
            return await Simulator(client).simulate("x", tokens)
        finally:
            await client.close()
    with stub:
        return asyncio.run(go())


DIGITS_ONLY = {str(d): -30.0 for d in range(10)}


def test_a_certain_ten_split_into_two_tokens_is_ten():
    certain_one = {**DIGITS_ONLY, "1": 0.0}
    sim = simulate(split_digit_stub("a\t10\n", {2: certain_one, 3: {"0": 0.0, "\n": -30.0}}), ["a"])
    assert sim.method == "logprobs" and sim.expected == pytest.approx([10.0], abs=1e-6)
    assert sim.missing == 0 and sim.sampled == 0


@pytest.mark.parametrize("answer", ["a\t1\n", "a\t10\n"])
def test_a_fifty_fifty_split_between_one_and_ten_is_their_mean(answer):
    # the first digit is surely "1"; after it "0" (making 10) and the end of the line are equally likely
    tops = {2: {**DIGITS_ONLY, "1": 0.0}, 3: {"0": math.log(0.5), "\n": math.log(0.5)}}
    sim = simulate(split_digit_stub(answer, tops), ["a"])
    assert sim.expected == pytest.approx([5.5])


def test_ten_is_read_jointly_next_to_other_values():
    # "b" is 1 or 10 at 50/50 and its first digit competes with "4" at 1:3, so E = 0.25*5.5 + 0.75*4
    # the stub's tokens: "a", "\t", "9", "\nb", "\t", "1", "0", "\n"
    tops = {2: {**DIGITS_ONLY, "9": 0.0}, 5: {**DIGITS_ONLY, "1": math.log(0.25), "4": math.log(0.75)},
            6: {"0": math.log(0.5), "\n": math.log(0.5)}}
    sim = simulate(split_digit_stub("a\t9\nb\t10\n", tops), ["a", "b"])
    assert sim.expected == pytest.approx([9.0, 0.25 * 5.5 + 0.75 * 4.0])


def test_a_value_without_digit_logprobs_is_the_written_integer_and_is_counted():
    sim = simulate(split_digit_stub("a\t7\nb\t3\n", {2: {"seven": 0.0}, 5: {**DIGITS_ONLY, "3": 0.0}}), ["a", "b"])
    assert sim.expected == pytest.approx([7.0, 3.0]) and sim.sampled == 1 and sim.missing == 0
