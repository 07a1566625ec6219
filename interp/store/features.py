"""Reading features back: a feature's examples as records (tokens decoded through the stored vocabulary), and
everything `interp feature` and the API show of one feature."""
from __future__ import annotations

import numpy as np
import psycopg
from pydantic import BaseModel

from sae.errors import InputError
from sae.records import Example, FeatureExamples

from .labels import LabelView, labels_of
from .saes import n_features, require_sae
from .vocab import decode_ids


def load_feature_examples(conn: psycopg.Connection, sae_name: str, index: int,
                          split: str | None = None) -> FeatureExamples:
    """One feature's examples as records, tokens decoded through the stored vocabulary."""
    found, missing = load_many(conn, sae_name, [index], split)
    if missing:
        raise InputError(no_feature(conn, sae_name, index))
    return found[0]


def no_feature(conn: psycopg.Connection, sae_name: str, index: int) -> str:
    return f"SAE {sae_name!r} has no feature {index}; valid: 0..{n_features(conn, require_sae(conn, sae_name)) - 1}"


def load_many(conn: psycopg.Connection, sae_name: str, indices: list[int],
              split: str | None = None) -> tuple[list[FeatureExamples], list[int]]:
    """Several features' examples in five queries whatever their number (a labelling worker loads a batch at
    once); returns them in the order asked, and the indices the SAE does not have."""
    row = conn.execute("SELECT id, tokenizer FROM saes WHERE name = %s", (sae_name,)).fetchone()
    if row is None:
        require_sae(conn, sae_name)     # raises its one line naming the SAEs that exist
    sid, tok_key = row
    feats = {r[0]: r[1:] for r in conn.execute(
        "SELECT idx, max_act, density FROM features WHERE sae_id = %s AND idx = ANY(%s)", (sid, list(indices)))}
    rows = conn.execute(
        "SELECT feature, kind, split, width, ctx, start, max_pos, quantile_bin, scale, acts FROM examples"
        " WHERE sae_id = %s AND feature = ANY(%s) AND (%s::text IS NULL OR split = %s)"
        " ORDER BY feature, array_position(ARRAY['top', 'quantile', 'random'], kind), split",
        (sid, list(feats), split, split)).fetchall()
    contexts = dict(conn.execute("SELECT ctx, token_ids FROM contexts WHERE sae_id = %s AND ctx = ANY(%s)",
                                 (sid, sorted({c for r in rows for c in r[4]}))).fetchall())
    examples: dict[int, list[Example]] = {f: [] for f in feats}
    for feature, kind, sp, width, ctxs, starts, _max_pos, qbins, scales, acts in rows:
        # one numpy product per row of examples: per example, it was most of a labelling worker's load time
        rows_acts = (np.frombuffer(acts, dtype=np.uint8).reshape(len(ctxs), width) / 255.0
                     * np.asarray(scales, dtype=np.float64)[:, None]).tolist()
        examples[feature] += [Example(token_ids=contexts[c][s:s + width], acts=a, kind=kind, split=sp,
                                      quantile_bin=qbins[i] if qbins else None)
                              for i, (c, s, a) in enumerate(zip(ctxs, starts, rows_acts))]
    vocab = decode_ids(conn, tok_key, {t for exs in examples.values() for e in exs for t in e.token_ids})
    if vocab:
        for e in (e for exs in examples.values() for e in exs):
            e.tokens = [vocab.get(t, f"<{t}>") for t in e.token_ids]
    found = [FeatureExamples(sae=sae_name, index=f, examples=examples[f], max_act=float(feats[f][0]),
                             density=float(feats[f][1])) for f in indices if f in feats]
    return found, [f for f in indices if f not in feats]


class FeatureView(BaseModel):
    """Everything `interp feature` and the feature page show of one feature."""
    sae: str
    index: int
    density: float
    n_fired: int
    max_act: float
    mean_act: float
    hist: list[int]
    hist_max: float
    top_logits: list[str] | None
    bottom_logits: list[str] | None
    examples: FeatureExamples
    labels: list[LabelView]


def feature_view(conn: psycopg.Connection, sae_name: str, index: int) -> FeatureView:
    ex = load_feature_examples(conn, sae_name, index)
    sid = require_sae(conn, sae_name)
    d, nf, mx, mean, hist, hmax, tl, bl, tok = conn.execute(
        "SELECT f.density, f.n_fired, f.max_act, f.mean_act, f.hist, f.hist_max, f.top_logits, f.bottom_logits,"
        " s.tokenizer FROM features f JOIN saes s ON s.id = f.sae_id WHERE f.sae_id = %s AND f.idx = %s",
        (sid, index)).fetchone()
    vocab = decode_ids(conn, tok, set(tl or []) | set(bl or []))

    def names(ids):
        return [vocab.get(t, f"<{t}>") for t in ids] if ids else None

    return FeatureView(sae=sae_name, index=index, density=d, n_fired=nf, max_act=mx, mean_act=mean, hist=list(hist),
                       hist_max=hmax, top_logits=names(tl), bottom_logits=names(bl), examples=ex,
                       labels=labels_of(conn, sid, index))
