"""explain-v3, the small-model explain prompt: the marked tokens that fire most are listed under the examples
(a 135M model otherwise labels the snippets' code, not the marks), and every few-shot answer names the token
pattern. explain-v2 stays loadable and renders as before."""
import asyncio

from interp import prompts
from interp.explainers import LLMExplainer
from interp.llm import OpenAIClient
from interp.prompts import parse_label
from sae.records import Example, FeatureExamples
from tests.stub_llm import Reply, StubLLM


def test_top_tokens_rank_marked_tokens_by_summed_activation():
    snippets = [([" a", " def", " x"], [0.0, 4.0, 1.0]), ([" def", "<", "\n", "  "], [4.0, 4.0, 2.0, 2.0])]
    # 0-10 scale of max 4: def 10+10, "<" 10, newline 5, spaces 5, x 2; corpus text escaped, blanks visible
    assert prompts.top_tokens(snippets, max_act=4.0) == '"def", "\\<", "\\n", "\'  \'", "x"'
    assert prompts.top_tokens(snippets, max_act=4.0, n=1) == '"def"'
    assert prompts.top_tokens([([" a"], [0.0])], max_act=1.0) == "none"


def test_explain_v3_few_shot_turns_show_the_token_line_and_answers_name_the_tokens():
    p = prompts.load("explain-v3")
    msgs = p.messages(examples="Example 1: <<a>>\nActivations: a=10", top_tokens='"a"')
    users = [m["content"] for m in msgs if m["role"] == "user"]
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(answers) >= 2 and all(u.splitlines()[-1].startswith("Tokens that fire most: ") for u in users)
    # each worked answer parses and quotes a token its own turn listed: the pattern the small model copies
    for u, a in zip(users, answers):
        listed = u.splitlines()[-1].removeprefix("Tokens that fire most: ")
        assert parse_label(a) and any(tok.strip() in a for tok in listed.split(","))
    assert users[-1].endswith('Example 1: <<a>>\nActivations: a=10\nTokens that fire most: "a"')


def feature():
    exs = [Example(token_ids=[i, 7, i + 100], acts=[0.0, 1.0 + i, 0.5], tokens=[f" w{i}", " state", " f"])
           for i in range(4)]
    return FeatureExamples(sae="t", index=0, examples=exs, max_act=4.0)


def last_user_message(version: str) -> tuple[str, str]:
    with StubLLM() as stub:
        stub.responder = lambda body: Reply('Label: the word "state"')

        async def go():
            client = OpenAIClient(model="m", base_url=stub.url, api_key="k", timeout_s=5, max_retries=0, grammar_ok=True)
            try:
                return await LLMExplainer(client, prompt_version=version).explain(feature())
            finally:
                await client.close()

        ex = asyncio.run(go())
        assert ex.prompt_version == version and stub.requests[0]["grammar"] == prompts.LABEL_GRAMMAR
        return ex.label, stub.requests[0]["messages"][-1]["content"]


def test_the_explainer_fills_the_token_line_and_v2_renders_without_it():
    label, v3 = last_user_message("explain-v3")
    assert label == 'the word "state"' and v3.splitlines()[-1] == 'Tokens that fire most: "state", "f"'
    _, v2 = last_user_message("explain-v2")
    assert "Tokens that fire most" not in v2 and v2.splitlines()[-1].startswith("Activations: state=")
