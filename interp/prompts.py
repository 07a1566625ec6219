"""Prompt templates (versioned files in interp/prompts/), snippet rendering, escaping and label parsing.

A template file `NAME-vN.txt` holds a system part, then turns each opened by `=== user ===` or
`=== assistant ===` (the last one a user turn), with
`$placeholders` (string.Template, so braces in corpus text or JSON examples need no escaping). The file
stem is the version stored with every label and score.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template

from sae.errors import InputError

from .scoring import normalise_activations

PROMPTS = Path(__file__).parent / "prompts"
MAX_LABEL = 200
OPEN, CLOSE = "<<", ">>"
DEFAULT_VERSIONS = {"explain": "explain-v3", "simulate": "simulate-v1", "simulate-json": "simulate-json-v1",
                    "detection": "detection-v1", "fuzzing": "fuzzing-v1"}


@dataclass(frozen=True)
class Prompt:
    version: str
    turns: tuple[tuple[str, Template], ...]     # (role, template); the first is the system turn

    def messages(self, **values) -> list[dict]:
        # only newlines are trimmed: a leading space may belong to the first token
        return [{"role": role, "content": t.substitute(values).strip() if role == "system"
                 else t.substitute(values).strip("\n")} for role, t in self.turns]


_TURN = re.compile(r"^=== (user|assistant) ===\n", re.M)


@lru_cache
def load(version: str) -> Prompt:
    """Sections: system text, then `=== user ===` / `=== assistant ===` turns (few-shot examples are turns)."""
    path = PROMPTS / f"{version}.txt"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.txt")))
        raise InputError(f"no prompt template {version!r}; available: {have}")
    parts = _TURN.split(path.read_text(encoding="utf-8"))
    if len(parts) < 3 or parts[-2] != "user":
        raise InputError(f"prompt template {path} needs a system part and turns ending with a '=== user ===' one")
    turns = [("system", Template(parts[0]))] + [(parts[i], Template(parts[i + 1])) for i in range(1, len(parts), 2)]
    return Prompt(version, tuple(turns))


def escape(text: str) -> str:
    """Corpus text, made unable to forge our markup: backslash-escape '\\', '<' and '>' (so no '<<' or '>>'
    can appear except ours), and show newlines and tabs as visible escapes so a snippet stays on one line
    and cannot start a fake 'Example' or token line."""
    return text.replace("\r\n", "\n").translate(_ESCAPES)


# the escapes above, and every other control character (Unicode category Cc: U+0000-001F, U+007F-009F) dropped;
# one translate per token, as a worker builds tens of thousands of snippet tokens a second
_ESCAPES = {ord("\\"): "\\\\", ord("<"): "\\<", ord(">"): "\\>", ord("\n"): "\\n", ord("\r"): "\\n", ord("\t"): "\\t"}
_ESCAPES |= {c: None for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in _ESCAPES}


def mark(tokens: list[str], marked: list[bool]) -> str:
    """One line of text with the marked tokens delimited; the delimiters are never escaped away."""
    return "".join(f"{OPEN}{escape(t)}{CLOSE}" if m else escape(t) for t, m in zip(tokens, marked))


def explain_block(snippets: list[tuple[list[str], list[float]]], max_act: float) -> str:
    """The explain set: each snippet with its firing tokens marked and their 0-10 activations listed."""
    out = []
    for i, (toks, acts) in enumerate(snippets, 1):
        norm = normalise_activations(acts, max_act)
        out.append(f"Example {i}: {mark(toks, [n > 0 for n in norm])}")
        fired = [f"{escape(t).strip() or repr(t)}={n}" for t, n in zip(toks, norm) if n > 0]
        out.append("Activations: " + (", ".join(fired) if fired else "none"))
    return "\n".join(out)


def top_tokens(snippets: list[tuple[list[str], list[float]]], max_act: float, n: int = 5) -> str:
    """The marked tokens that fire most, summed over the explain set on the 0-10 scale, as a short quoted list
    (delphi-style highlighted tokens): a small model otherwise describes the snippets' text, not the marks."""
    totals: dict[str, int] = {}
    for toks, acts in snippets:
        for t, a in zip(toks, normalise_activations(acts, max_act)):
            if a > 0:
                key = escape(t).strip() or repr(t)
                totals[key] = totals.get(key, 0) + a
    # ties keep first-seen order (dicts are ordered), so the list is deterministic
    ranked = sorted(totals, key=lambda k: -totals[k])[:n]
    return ", ".join(f'"{k}"' for k in ranked) if ranked else "none"


def token_lines(tokens: list[str]) -> str:
    """One token per line, for the simulator; empty-looking tokens stay visible."""
    return "\n".join(escape(t) if t.strip() else repr(t) for t in tokens)


def numbered_snippets(snippets: list[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(snippets, 1))


_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i won'?t|as an ai)", re.I)
# small models answer a prompt they cannot follow with a request for more input ("please provide the full
# code ..."): that is no label either, wherever in the answer it stands
_ASKS_FOR_INPUT = re.compile(r"\b(please (provide|share|give|send)|provide (me )?(with )?(the|more|some|additional)\b|"
                             r"(more|additional) (information|context|details|examples|input)|happy to (help|assist)|"
                             r"(is|are) not (available|provided)|i need (more|the)|could you (please )?(share|provide)|"
                             r"let me know)", re.I)
_LABEL = re.compile(r"label\s*[:：]\s*(.+)", re.I)


class LabelError(ValueError):
    """An answer that holds no usable label; the message is the failure reason recorded."""


def parse_label(answer: str | None, refusal: str | None = None) -> str:
    """One line, at most MAX_LABEL characters, no control characters; raises LabelError with the reason."""
    if refusal:
        raise LabelError("refusal")
    if answer is None or not answer.strip():
        raise LabelError("empty")
    if _REFUSAL.match(answer):
        raise LabelError("refusal")
    if _ASKS_FOR_INPUT.search(answer):
        raise LabelError("refusal: the answer asks for more input")
    m = _LABEL.search(answer)
    line = m.group(1) if m else next(ln for ln in answer.splitlines() if ln.strip())
    line = line.strip().rstrip(".").strip("*_`").strip().rstrip(".")
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1]
    line = clean_label(line)
    if line.lower() in ("<short description>", "short description"):
        raise LabelError("unparseable: the answer format's placeholder was echoed")
    if not any(ch.isalnum() for ch in line):
        raise LabelError(f"unparseable: {answer.strip()[:60]!r}")
    return line


# GBNF for llama.cpp endpoints: one line "Label: " and a phrase of 1 to 12 words, nothing after it. A small model
# then cannot chat, ask for more input or write a paragraph; it only chooses the words (none starting with "<":
# a 135M model otherwise echoes the "<short description>" placeholder).
LABEL_GRAMMAR = "\n".join([
    'root ::= "Label: " w (" " w){0,11}',
    r'w ::= [^ \n\t<] [^ \n\t]{0,23}',
])


def clean_label(line: str) -> str:
    """No control characters (other categories C too: format, surrogates), at most MAX_LABEL characters."""
    line = "".join(ch for ch in line if unicodedata.category(ch)[0] != "C").strip()
    if len(line) > MAX_LABEL:
        cut = line[:MAX_LABEL]
        line = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return line
