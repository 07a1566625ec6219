# Record rule: pydantic where a record crosses a process, database or JSON boundary (these records go to
# Celery, the store and --json); dataclasses inside a room (e.g. interp.llm.Completion); never bare tuples
# or dicts of dicts between rooms.
"""Records that leave the labelling step: one `Explanation` per label attempt, one `Score` per scorer run,
one `LabelResult` per feature."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Method = Literal["logprobs", "json", "mixed", "embedding", "none"]


class Usage(BaseModel):
    """LLM tokens spent; summed over every call (retries included) that produced a record."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls


class Explanation(BaseModel):
    sae: str
    index: int
    label: str | None                   # None when every attempt failed; see failure
    explainer: str                      # the model spec, e.g. "openai:gpt-4o-mini" or "baseline"
    prompt_version: str
    is_baseline: bool = False
    usage: Usage = Field(default_factory=Usage)
    failure: str | None = None          # why no label: "empty", "refusal", "unparseable: ...", "error: ..."
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.label is not None


class ExampleScore(BaseModel):
    """One scored snippet, so that a score can be audited: what was predicted against what was true."""
    example: int                        # position in the feature's score split
    kind: str                           # top | quantile | random
    true: list[float] | float           # per-token activations (simulation) or 1/0 activating (classifiers)
    predicted: list[float] | float | None
    probability: float | None = None    # P(activating) from logprobs or a similarity, when there is one
    missing: int = 0                    # simulated tokens the simulator gave no value for (scored as 0)


class Score(BaseModel):
    sae: str
    index: int
    scorer: str                         # simulation | detection | fuzzing | embedding
    simulator: str                      # the model spec that predicted
    prompt_version: str
    label: str
    method: Method
    value: float | None                 # the headline number (ev_correlation_score, balanced accuracy, AUROC)
    values: dict[str, float | None] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    breakdown: list[ExampleScore] = Field(default_factory=list)
    failure: str | None = None


class LabelResult(BaseModel):
    """One feature's labelling: its explanation and the scores of that label (none when it has no label, or
    when scoring failed; the explanation's failure then says why)."""
    explanation: Explanation
    scores: list[Score] = Field(default_factory=list)
