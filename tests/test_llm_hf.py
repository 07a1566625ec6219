"""`hf:PATH`: a local causal LM in-process (a tiny random GPT-2 with MiniLM's tokenizer, saved to tmp_path)."""
import asyncio

import pytest

from interp.llm import HFClient, LLMClient, LLMError, make_client
from interp.scorers import ScoreConfig, simulation
from interp.simulator import Simulator
from sae.errors import InputError
from sae.records import Example, FeatureExamples


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from sae.models import minilm_path

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    # instruct models ship a chat template; the client must use it
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(path)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=1024,
                               eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)).save_pretrained(path)
    return path


def test_hf_client_generates_with_top_logprobs_and_counts_tokens(tiny_lm):
    client = make_client(f"hf:{tiny_lm}")
    c = asyncio.run(client.chat([{"role": "user", "content": "hello world"}], max_tokens=5, logprobs=True,
                                top_logprobs=4))
    assert c.usage.prompt_tokens > 2 and 0 < c.usage.completion_tokens <= 5 and c.usage.calls == 1
    assert c.logprobs and all(len(t.top) == 4 and max(t.top.values()) <= 0.0 for t in c.logprobs)
    assert client.usage.total == c.usage.total and client.spec == f"hf:{tiny_lm}"


def test_hf_client_samples_when_temperature_is_positive_and_is_greedy_at_zero(tiny_lm):
    import torch

    client = make_client(f"hf:{tiny_lm}")
    assert isinstance(client, HFClient) and isinstance(client, LLMClient) and not client.grammar_ok
    msg = [{"role": "user", "content": "hello world"}]

    async def texts(temperature, n):
        return [(await client.chat(msg, max_tokens=6, temperature=temperature)).text for _ in range(n)]

    greedy = asyncio.run(texts(0.0, 2))
    torch.manual_seed(0)
    sampled = asyncio.run(texts(1.0, 3))
    assert greedy[0] == greedy[1]
    # a random model spreads its mass over the whole vocabulary: sampling cannot keep repeating greedy
    assert len(set(sampled)) > 1 and any(t != greedy[0] for t in sampled)
    c = asyncio.run(client.chat(msg, max_tokens=3))
    assert c.logprobs is None and c.usage.completion_tokens > 0     # no logprobs asked, none given


@pytest.mark.parametrize("option", [{"json_mode": True}, {"grammar": 'root ::= "x"'}])
def test_hf_client_refuses_what_it_cannot_enforce(tiny_lm, option):
    client = make_client(f"hf:{tiny_lm}")
    with pytest.raises(LLMError, match=f"cannot honour {next(iter(option))}"):
        asyncio.run(client.chat([{"role": "user", "content": "hi"}], max_tokens=2, **option))
    assert client.usage.calls == 0


def test_hf_client_runs_the_simulation_scorer(tiny_lm):
    exs = [Example(token_ids=[1, 2, 3], acts=[0.0, 1.0, 0.0], kind="top", split="score", tokens=["a", " b", " c"]),
           Example(token_ids=[4, 5, 6], acts=[0.0] * 3, kind="random", split="score", tokens=["d", " e", " f"])]
    s = asyncio.run(simulation(FeatureExamples(sae="t", index=0, examples=exs), "letters",
                               Simulator(make_client(f"hf:{tiny_lm}")), ScoreConfig(n_active=1, n_random=1)))
    assert s.method == "logprobs" and s.simulator.startswith("hf:") and s.usage.calls == 2
    # a random model writes no `token<TAB>N` line for our tokens: every token is missing, scored 0, and counted
    assert [b.missing for b in s.breakdown] == [3, 3] and s.values["missing_tokens"] == 6
    assert all(b.predicted == [0.0, 0.0, 0.0] for b in s.breakdown) and s.value is None


def test_hf_bad_path_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot load a causal LM from"):
        make_client(f"hf:{tmp_path / 'nope'}")
