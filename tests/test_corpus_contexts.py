"""Corpora: the builtin one's size and content, seeded order, disjoint train/eval splits, local files, bad input."""
from __future__ import annotations

import ast
import json
import pydoc_data.topics
import random
from collections import Counter

import pytest

from sae.corpus import EVAL_EVERY, _builtin_docs, batches, iter_contexts, iter_texts
from sae.errors import InputError
from sae.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "topics.txt"
    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:25]))
    return path


def test_builtin_holds_over_a_million_tokens(tok):
    docs = _builtin_docs()
    texts = [read() for _, read in docs]
    chars = sum(map(len, texts))
    # tokens per character measured on a seeded sample of documents, then extrapolated
    sample = random.Random(0).sample(texts, 60)
    per_char = sum(len(ids) for ids in tok(sample, add_special_tokens=False, verbose=False)["input_ids"]) \
        / sum(map(len, sample))
    assert chars * per_char > 2_000_000
    assert chars / 8 > 1_000_000  # even at 8 characters per token, which no subword tokenizer reaches on this text


def test_builtin_has_prose_and_code():
    docs = dict(_builtin_docs())
    prose = [name for name in docs if name.startswith("pydoc:")]
    code = [name for name in docs if name.startswith("stdlib:")]
    assert len(prose) > 50 and len(code) > 300
    prose_text = " ".join(docs[n]() for n in prose)
    assert len(prose_text) > 400_000 and Counter(prose_text.split())["the"] > 3_000
    for name in random.Random(1).sample(code, 5):
        ast.parse(docs[name]())


def test_builtin_order_is_seeded(tok):
    def first(seed):
        return [ctx for ctx, _ in zip(iter_contexts("builtin", tok, ctx_len=64, seed=seed), range(4))]

    a, b, c = first(0), first(0), first(1)
    assert a == b and a != c
    assert all(len(ctx) == 64 and ctx[0] == tok.cls_token_id for ctx in a)


def test_train_and_eval_splits_are_disjoint_and_cover_all(tok, text_file):
    every = list(iter_contexts(str(text_file), tok, ctx_len=32))
    train = list(iter_contexts(str(text_file), tok, ctx_len=32, split="train"))
    held = list(iter_contexts(str(text_file), tok, ctx_len=32, split="eval"))
    assert len(every) > 100 and len(held) == len(every) // EVAL_EVERY
    assert held == every[EVAL_EVERY - 1::EVAL_EVERY]
    assert not {tuple(c) for c in train} & {tuple(c) for c in held}
    assert Counter(map(tuple, train + held)) == Counter(map(tuple, every))
    assert list(iter_contexts(str(text_file), tok, ctx_len=32, split="train", skip=5)) == train[5:]


def test_missing_and_empty_corpora(tok, tmp_path):
    with pytest.raises(InputError, match="not found"):
        next(iter_contexts(str(tmp_path / "nope.txt"), tok))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(InputError, match="is empty"):
        next(iter_contexts(str(tmp_path / "empty.txt"), tok))
    (tmp_path / "short.txt").write_text("too short for a context")
    with pytest.raises(InputError, match="fewer than 128 tokens"):
        next(iter_contexts(str(tmp_path / "short.txt"), tok))
    with pytest.raises(InputError, match="--ctx-len must be at least 2"):
        next(iter_contexts("builtin", tok, ctx_len=1))


def test_jsonl_and_folders(tok, tmp_path, text_file):
    words = text_file.read_text().split()
    rows = [{"text": " ".join(words[i:i + 200])} for i in range(0, 2000, 200)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d" / "b.txt").write_text(" ".join(words[5000:6000]))
    texts = list(iter_texts(str(tmp_path / "d")))
    assert len(texts) == 11 and rows[3]["text"] in texts
    ctxs = list(iter_contexts(str(tmp_path / "d"), tok, ctx_len=64))
    assert len(ctxs) > 20 and all(len(c) == 64 for c in ctxs)

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match=r'bad.jsonl:2 has no "text" field'):
        list(iter_texts(str(tmp_path / "bad.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:1 is not valid JSON"):
        list(iter_texts(str(tmp_path / "broken.jsonl")))


def test_hf_corpus_without_a_hub_is_one_line(tok):
    with pytest.raises(InputError, match="cannot stream Hugging Face dataset 'no-such/dataset'"):
        next(iter_contexts("hf:no-such/dataset", tok))


def test_batches(tok, text_file):
    ctxs = list(iter_contexts(str(text_file), tok, ctx_len=16))[:10]
    shapes = [tuple(b.shape) for b in batches(iter(ctxs), 4)]
    assert shapes == [(4, 16), (4, 16), (2, 16)]


def test_corpus_too_small_for_a_held_out_split(tok, tmp_path, text_file):
    (tmp_path / "small.txt").write_text(" ".join(text_file.read_text().split()[:300]))
    assert len(list(iter_contexts(str(tmp_path / "small.txt"), tok, ctx_len=64))) >= 2
    with pytest.raises(InputError, match="too small for a held-out split: it holds [0-9] contexts of 64 tokens"):
        next(iter_contexts(str(tmp_path / "small.txt"), tok, ctx_len=64, split="eval"))
