"""Corpora and fixed-length token contexts.

CORPUS is `builtin` (the Python standard library's documentation topics and sources: prose and code,
shipped with every Python), a local .txt/.jsonl file or folder, or `hf:NAME[:SPLIT]` (streamed).
Documents come in a seeded order; their tokens are packed into contexts of `ctx_len`.
"""
from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import InputError, first_line

# every EVAL_EVERY-th context is held out for evaluation and never used in training
EVAL_EVERY = 10


def _builtin_docs() -> list[tuple[str, callable]]:
    import pydoc_data.topics as topics

    docs = [(f"pydoc:{k}", (lambda v=v: v)) for k, v in sorted(topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        docs.append((f"stdlib:{'/'.join(rel)}", (lambda p=p: p.read_text(encoding="utf-8", errors="replace"))))
    return docs


def _file_docs(path: Path) -> list[tuple[str, callable]]:
    files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".jsonl", ".md")) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{f}:{i + 1} is not valid JSON; a .jsonl corpus needs one "
                                     '{"text": ...} object per line') from None
                text = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
                if not isinstance(text, str):
                    raise InputError(f'{f}:{i + 1} has no "text" field; a .jsonl corpus needs {{"text": ...}} per line')
                docs.append((f"{f.name}:{i}", (lambda t=text: t)))
        else:
            docs.append((str(f), (lambda f=f: f.read_text(encoding="utf-8", errors="replace"))))
    return docs


def _hf_texts(spec: str, seed: int) -> Iterator[str]:
    parts = spec.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split, streaming=True).shuffle(seed=seed)
        for row in ds:
            yield row["text"]
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot stream Hugging Face dataset {name!r} split {split!r}: {first_line(e)}") from None


def iter_texts(corpus: str, seed: int = 0) -> Iterator[str]:
    if corpus.startswith("hf:"):
        yield from _hf_texts(corpus, seed)
        return
    if corpus == "builtin":
        docs = _builtin_docs()
    else:
        path = Path(corpus)
        if not path.exists():
            raise InputError(f"corpus {corpus!r} not found; give 'builtin', a .txt/.jsonl file or folder, or hf:NAME[:SPLIT]")
        docs = _file_docs(path)
    random.Random(seed).shuffle(docs)
    for _, read in docs:
        text = read()
        if text.strip():
            yield text


def iter_contexts(corpus: str, tokenizer, ctx_len: int = 128, seed: int = 0, split: str = "all",
                  skip: int = 0) -> Iterator[list[int]]:
    """Yields contexts of exactly ctx_len token ids, deterministic for (corpus, tokenizer, ctx_len, seed).

    split: "train" drops every EVAL_EVERY-th context, "eval" keeps only those, "all" keeps both.
    skip: number of contexts (of the split) to skip, for resuming.
    """
    if ctx_len < 2:
        raise InputError(f"--ctx-len must be at least 2, got {ctx_len}")
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    body = ctx_len - (1 if bos is not None else 0)
    buf: list[int] = []
    index = kept = 0
    produced = False
    for text in iter_texts(corpus, seed):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            held_out = index % EVAL_EVERY == EVAL_EVERY - 1
            index += 1
            if split == "all" or (split == "eval") == held_out:
                produced = True
                if kept >= skip:
                    yield ([bos] if bos is not None else []) + chunk
                kept += 1
    if not produced:
        if split == "eval" and index > 0:
            raise InputError(f"corpus {corpus!r} is too small for a held-out split: it holds {index} contexts of "
                             f"{ctx_len} tokens and every {EVAL_EVERY}th is held out; give at least "
                             f"{EVAL_EVERY * ctx_len} tokens of text")
        raise InputError(f"corpus {corpus!r} is empty: it holds fewer than {ctx_len} tokens for the {split} split")


def batches(contexts: Iterator[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    batch = []
    for ctx in contexts:
        batch.append(ctx)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch:
        yield torch.tensor(batch, dtype=torch.long)
