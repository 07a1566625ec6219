"""Scorers through the real client and the stub over HTTP: simulation from logprobs and its JSON fallback,
detection and fuzzing, the held-out guard, and the per-example breakdown."""
import json
import re

import pytest

from interp.explainers import LLMExplainer
from interp.llm import Backoff, NullClient, OpenAIClient
from interp.scorers import classify, run_scorers, score_set, simulation
from interp.simulator import Simulator
from sae.errors import InputError
from sae.records import Example, FeatureExamples
from tests.stub_llm import Reply, StubLLM, closing, run_closing, simulation_reply


def feature(n=6):
    """Fires on " 7"; explain and score snippets disjoint, each split with top and random examples."""
    exs = []
    for split in ("explain", "score"):
        for i in range(n):
            toks = [f" w{split[0]}{i}", " 7", f" v{i}", " 3"]
            exs.append(Example(token_ids=[hash((split, i, j)) % 10**6 for j in range(4)], acts=[0.0, 2.0 + i, 0.0, 0.0],
                               kind="top", split=split, tokens=toks))
            rtoks = [f" r{split[0]}{i}", " a", " b"]
            exs.append(Example(token_ids=[hash((split, "r", i, j)) % 10**6 for j in range(3)], acts=[0.0] * 3,
                               kind="random", split=split, tokens=rtoks))
    return FeatureExamples(sae="t", index=5, examples=exs, max_act=7.0)


def token_lines_of(body):
    user = body["messages"][-1]["content"]
    return [ln for ln in user.split("\n") if not ln.startswith(("There are", "Feature:", "Tokens:"))]


def oracle(body):
    """A simulator that knows the rule: 9.0 on " 7", 0.5 elsewhere; a detector that says 1 when " 7" is there."""
    system = body["messages"][0]["content"]
    if system.startswith("You label"):
        return Reply("Label: the digit 7")
    if "0-10 scale" in system and "JSON" not in system:
        lines = token_lines_of(body)
        return simulation_reply(lines, [9.0 if ln == " 7" else 0.5 for ln in lines])
    if "0-10 scale" in system:
        lines = token_lines_of(body)
        return Reply(json.dumps({"activations": [9 if ln == " 7" else 0 for ln in lines]}))
    if "numbered text snippets" in system:
        snippets = re.findall(r"^\d+\. (.*)$", body["messages"][-1]["content"], re.M)
        fuzz = "marked" in system
        ans = [int(("<< 7>>" if fuzz else " 7") in s) for s in snippets]
        return Reply(json.dumps(ans), tops={1 + 3 * i: {"1": -0.1, "0": -2.4} if a else {"0": -0.1, "1": -2.4}
                                            for i, a in enumerate(ans)})
    raise AssertionError(f"unexpected prompt: {system[:80]}")


@pytest.fixture
def stub():
    with StubLLM() as s:
        s.responder = oracle
        yield s


def client(stub, name="sim-model"):
    return closing(OpenAIClient(model=name, base_url=stub.url, api_key="k", timeout_s=5, max_retries=1,
                                backoff=Backoff(0.01, 0.02)))


def all_prompt_text(stub):
    return "\n".join(m["content"] for b in stub.requests for m in b["messages"])


def test_simulation_reads_expected_values_from_logprobs_on_the_score_set_only(stub):
    fe = feature()
    s = run_closing(simulation(fe, "the digit 7", Simulator(client(stub))))
    assert s.method == "logprobs" and s.prompt_version == "simulate-v1" and s.simulator == "openai:sim-model"
    # expected values 9.0 / 0.5 came from the renormalised top logprobs, not from the rounded text digits
    top = next(b for b in s.breakdown if b.kind == "top")
    assert top.predicted == pytest.approx([0.5, 9.0, 0.5, 0.5]) and top.true[1] > 0
    assert s.value == pytest.approx(s.values["ev_correlation_score"]) and s.value > 0.9
    assert s.usage.calls == 12 and s.usage.prompt_tokens > 0 and s.failure is None
    text = all_prompt_text(stub)
    assert " ws0" in text and " we0" not in text and " re0" not in text      # never an explain-set snippet


def test_simulation_falls_back_to_json_without_logprobs_and_records_it(stub):
    stub.fault("nologprobs")
    s = run_closing(simulation(feature(), "the digit 7", Simulator(client(stub))))
    assert s.method == "json" and s.prompt_version == "simulate-json-v1"
    top = next(b for b in s.breakdown if b.kind == "top")
    assert top.predicted == [0.0, 9.0, 0.0, 0.0]
    assert s.value > 0.9
    assert sum(b.get("response_format") == {"type": "json_object"} for b in stub.requests) == 12


def test_simulation_records_failed_sequences(stub):
    stub.fault("500", "500")
    s = run_closing(simulation(feature(), "x", Simulator(client(stub))))
    assert s.failure.startswith("1/12 sequences failed: error: HTTP 500")


def test_wrong_label_simulates_worse_than_right_label(stub):
    def literal(body):
        lines = token_lines_of(body)
        want = re.search(r"Feature: the token (\S+)", body["messages"][-1]["content"]).group(1)
        return simulation_reply(lines, [8.0 if ln.strip() == want else 0.0 for ln in lines])

    stub.responder = literal
    fe = feature()
    right = run_closing(simulation(fe, "the token 7", Simulator(client(stub))))
    wrong = run_closing(simulation(fe, "the token 3", Simulator(client(stub))))
    assert right.value > 0.9 and wrong.value < 0.1


@pytest.mark.parametrize("kind", ["detection", "fuzzing"])
def test_detection_and_fuzzing_batches_of_five_with_auroc(stub, kind):
    fe = feature()
    s = run_closing(classify(kind, fe, "the digit 7", client(stub)))
    assert len(stub.requests) == 3                          # 12 snippets in batches of 5, 5, 2
    assert s.values["balanced_accuracy"] == 1.0 and s.values["f1"] == 1.0 and s.values["auroc"] == 1.0
    assert s.method == "logprobs" and len(s.breakdown) == 12
    assert {b.kind for b in s.breakdown} == {"top", "random"}
    assert all(b.probability is not None for b in s.breakdown)
    text = all_prompt_text(stub)
    assert " we0" not in text


def test_fuzzing_marks_random_snippets_as_often_as_activating_ones(stub):
    run_closing(classify("fuzzing", feature(), "x", client(stub)))
    snippets = [s for b in stub.requests for s in re.findall(r"^\d+\. (.*)$", b["messages"][1]["content"], re.M)]
    marks = [s.count("<<") for s in snippets]
    assert len(snippets) == 12 and all(m == 1 for m in marks)      # 1 firing token each; randoms get 1 too


def test_detection_without_logprobs_has_no_auroc(stub):
    stub.fault("nologprobs", "nologprobs", "nologprobs")
    s = run_closing(classify("detection", feature(), "the digit 7", client(stub)))
    assert s.method == "json" and s.values["auroc"] is None and s.values["balanced_accuracy"] == 1.0


def leaked_feature():
    fe = feature()
    leaked = fe.split("explain")[0]
    fe.examples.append(Example(token_ids=list(leaked.token_ids), acts=list(leaked.acts), split="score",
                               tokens=leaked.tokens))
    return fe


def test_a_leaked_snippet_is_dropped_and_counted_never_scored_nor_raised(stub):
    fe = leaked_feature()
    held = score_set(fe)
    assert held.leaked == 1 and len(held.examples) == len(fe.split("score")) - 1
    leaked_ids = tuple(fe.split("explain")[0].token_ids)
    assert all(tuple(e.token_ids) != leaked_ids for e in held.examples)
    scores = run_closing(run_scorers(fe, "the digit 7", ["simulation", "detection"], client(stub)))
    assert [s.values["leaked_dropped"] for s in scores] == [1, 1] and all(s.failure is None for s in scores)
    assert " we0" not in all_prompt_text(stub)                      # the leaked text reached no prompt
    assert score_set(feature()).leaked == 0


def test_normalised_simulation_scores_do_not_depend_on_the_feature_scale(stub):
    small = feature()
    big = feature()
    for e in big.examples:
        e.acts = [a * 1000 for a in e.acts]
    big.max_act *= 1000
    a = run_closing(simulation(small, "the digit 7", Simulator(client(stub))))
    b = run_closing(simulation(big, "the digit 7", Simulator(client(stub))))
    # the published raw-scale scores move with the scale; the stored normalised variants do not
    assert a.values["rsquared_score"] != pytest.approx(b.values["rsquared_score"])
    for k in ("rsquared_score_normalised", "absolute_dev_explained_score_normalised"):
        assert a.values[k] is not None and a.values[k] == pytest.approx(b.values[k]), k
    assert a.value == pytest.approx(b.value)                         # ev_correlation stays the headline
    assert a.values["missing_tokens"] == 0 and a.values["sampled_tokens"] == 0


def test_explainer_and_simulator_can_be_different_models(stub):
    async def both():
        ex = await LLMExplainer(client(stub, "explainer-model")).explain(feature())
        scores = await run_scorers(feature(), ex.label, ["simulation", "detection"], client(stub, "sim-model"))
        return ex, scores

    ex, scores = run_closing(both())
    assert ex.label == "the digit 7" and ex.explainer == "openai:explainer-model" and ex.prompt_version == "explain-v3"
    assert {s.simulator for s in scores} == {"openai:sim-model"}
    models = [b["model"] for b in stub.requests]
    assert models[0] == "explainer-model" and set(models[1:]) == {"sim-model"}
    explain_prompt = stub.requests[0]["messages"][-1]["content"]
    assert "<< 7>>" in explain_prompt and " ws0" not in explain_prompt


def test_explainer_retries_bad_answers_then_records_the_reason(stub):
    stub.fault("empty", "refusal", "empty")
    ex = run_closing(LLMExplainer(client(stub), attempts=3).explain(feature()))
    assert ex.label is None and ex.failure == "empty" and ex.attempts == 3
    # a retry after a bad answer samples rather than repeating the greedy one
    assert [b["temperature"] for b in stub.requests] == [0.0, 0.7, 0.7]
    stub.fault("refusal")
    ok = run_closing(LLMExplainer(client(stub), attempts=3).explain(feature()))
    assert ok.label == "the digit 7" and ok.attempts == 2 and ok.usage.calls == 2
    stub.fault("400")
    err = run_closing(LLMExplainer(client(stub)).explain(feature()))
    assert err.label is None and err.failure.startswith("error: HTTP 400")


def test_run_scorers_rejects_llm_scorers_without_an_llm():
    with pytest.raises(InputError, match="need an LLM simulator"):
        run_closing(run_scorers(feature(), "x", ["simulation"], NullClient()))
    with pytest.raises(InputError, match="need an LLM simulator"):
        run_closing(run_scorers(feature(), "x", ["detection"], None))
    with pytest.raises(InputError, match="unknown scorer 'simulatoin'"):
        run_closing(run_scorers(feature(), "x", ["simulatoin"], None))


def test_label_features_runs_a_chunk_concurrently_in_one_loop(monkeypatch):
    from interp.scorers import label_features
    from interp.settings import get_settings

    with StubLLM(latency_s=0.2) as stub:
        stub.responder = oracle
        monkeypatch.setenv("OPENAI_BASE_URL", stub.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        get_settings.cache_clear()
        try:
            out = run_closing(label_features([feature() for _ in range(4)], "openai:explainer", "openai:sim",
                                             ["detection"]))
        finally:
            get_settings.cache_clear()
    assert [r.explanation.label for r in out] == ["the digit 7"] * 4
    assert all(r.scores[0].values["balanced_accuracy"] == 1.0 for r in out)
    assert len(stub.requests) == 4 * (1 + 3) and stub.max_in_flight >= 4     # not one feature after another
    assert {b["model"] for b in stub.requests} == {"explainer", "sim"}


def broken_feature():
    """Its score split holds a record no scorer can render (tokens that are not strings): scoring raises."""
    fe = feature()
    fe.split("score")[0].tokens = [None] * 4
    return fe


def test_one_failing_feature_does_not_abort_the_chunk(stub):
    from interp.records import LabelResult
    from interp.scorers import label_features

    async def chunk():
        cl = client(stub)
        return await label_features([feature(), leaked_feature(), broken_feature(), feature()], "openai:sim-model",
                                    None, ["detection"], clients={"openai:sim-model": cl}), cl

    out, cl = run_closing(chunk())
    assert all(isinstance(r, LabelResult) for r in out)
    good, leaked, bad = [out[0], out[3]], out[1], out[2]
    assert all(r.explanation.failure is None and r.scores[0].value == 1.0 for r in good)
    # a leak is no failure any more: the snippet is dropped and counted, the rest is scored
    assert leaked.explanation.failure is None and leaked.scores[0].values["leaked_dropped"] == 1
    assert bad.explanation.label == "the digit 7" and bad.scores == []
    assert bad.explanation.failure.startswith("error: scoring failed: ")
    assert cl.usage.calls == len(stub.requests)        # a client passed in is used (and left to its owner)


def test_baseline_takes_the_llm_free_path_and_refuses_llm_scorers():
    from interp.scorers import label_features

    (r,) = run_closing(label_features([feature()], "baseline", None, []))
    assert r.explanation.is_baseline and r.explanation.explainer == "baseline" and '" 7"' in r.explanation.label
    assert r.explanation.usage.calls == 0 and r.scores == []
    with pytest.raises(InputError, match="need an LLM simulator"):
        run_closing(label_features([feature()], "baseline", None, ["detection"]))
