"""Plain records that leave `sae/` (harvest output) and that `interp` reads back from the catalog."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["top", "quantile", "random"]
Split = Literal["explain", "score"]


@dataclass
class Example:
    """One snippet: a window of tokens and the feature's activation on each."""
    token_ids: list[int]
    acts: list[float]
    kind: Kind = "top"
    split: Split = "explain"
    quantile_bin: int | None = None     # 0..n_bins-1 for kind == "quantile"
    tokens: list[str] | None = None     # decoded token strings, filled from the vocabulary when known

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    @property
    def max_pos(self) -> int:
        return max(range(len(self.acts)), key=self.acts.__getitem__) if self.acts else 0


@dataclass
class FeatureExamples:
    """Everything the explainer and scorers may see of one feature."""
    sae: str
    index: int
    examples: list[Example] = field(default_factory=list)
    max_act: float = 0.0
    density: float = 0.0

    def split(self, which: Split) -> list[Example]:
        return [e for e in self.examples if e.split == which]
