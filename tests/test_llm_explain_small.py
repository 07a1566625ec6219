"""What makes the explain step usable with a small model: the few-shot prompt file, the label grammar sent
to endpoints that enforce one (llama.cpp), and a refusal check that catches requests for more input."""
import asyncio

import pytest

from interp import prompts
from interp.explainers import LLMExplainer
from interp.llm import OpenAIClient
from interp.prompts import LabelError, parse_label
from sae.records import Example, FeatureExamples
from tests.stub_llm import Reply, StubLLM


def feature():
    exs = [Example(token_ids=[i, 7, i + 100], acts=[0.0, 1.0 + i, 0.0], tokens=[f" w{i}", " def", " f"])
           for i in range(4)]
    return FeatureExamples(sae="t", index=0, examples=exs, max_act=4.0)


def explain_with(answer: str, grammar_ok: bool):
    with StubLLM() as stub:
        stub.responder = lambda body: Reply(answer)

        async def go():
            client = OpenAIClient(model="m", base_url=stub.url, api_key="k", timeout_s=5, max_retries=0,
                                  grammar_ok=grammar_ok)
            try:
                return await LLMExplainer(client, attempts=2).explain(feature())
            finally:
                await client.close()

        return asyncio.run(go()), stub.requests


@pytest.mark.parametrize("answer", [
    "The code is not available. Please provide the full answer with a short description, and I'll be happy to "
    "assist you further",
    "Label: Could you please share more examples?",
    "I need more context to label this feature.",
    "Label: please provide the code",
])
def test_requests_for_more_input_are_refusals_not_labels(answer):
    with pytest.raises(LabelError, match="refusal"):
        parse_label(answer)


@pytest.mark.parametrize("answer,label", [
    ("Label: days of the week", "days of the week"),
    ("Label: more than one digit in a number", "more than one digit in a number"),
    ("Label: the word please", "the word please"),
])
def test_ordinary_labels_still_parse(answer, label):
    assert parse_label(answer) == label


def test_the_default_explain_prompt_is_few_shot_and_versioned():
    p = prompts.load(prompts.DEFAULT_VERSIONS["explain"])
    msgs = p.messages(examples="Example 1: <<a>>", top_tokens='"a"')
    assert p.version == "explain-v3"
    roles = [m["role"] for m in msgs]
    assert roles[0] == "system" and roles[-1] == "user" and roles.count("assistant") >= 2
    # each worked answer has the exact form the parser reads
    assert all(parse_label(m["content"]) for m in msgs if m["role"] == "assistant")
    assert "Example 1: <<a>>" in msgs[-1]["content"]


def test_the_label_grammar_goes_to_endpoints_that_enforce_one_only():
    ex, reqs = explain_with("Label: the keyword def", grammar_ok=True)
    assert ex.label == "the keyword def" and ex.prompt_version == "explain-v3"
    assert reqs[0]["grammar"] == prompts.LABEL_GRAMMAR
    ex, reqs = explain_with("Label: the keyword def", grammar_ok=False)
    assert ex.label == "the keyword def" and "grammar" not in reqs[0]


def test_a_request_for_more_input_is_retried_and_never_stored_as_a_label():
    ex, reqs = explain_with("Please provide the full code and I'll be happy to help.", grammar_ok=True)
    assert ex.label is None and ex.failure.startswith("refusal") and len(reqs) == 2
