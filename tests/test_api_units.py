"""The API's and dashboard's pure parts: cursors, the auth decision, and the HTML pieces of the feature page."""
import math
import re
from types import SimpleNamespace

import pytest
from fastapi import HTTPException
from pydantic import SecretStr
from starlette.datastructures import Headers

from interp.api import after_cursor, auth_problem, decode_cursor, encode_cursor
from interp.settings import Settings
from interp.web import HIST_H, histogram_svg, shown_tokens, snippet_html
from sae.records import Example


@pytest.mark.parametrize("key,shape", [(["sae_b"], (str,)), ([0.0163, "a/b", 7], (float, str, int)),
                                       (["ünï \"q\""], (str,))])
def test_a_cursor_decodes_to_the_key_it_encodes(key, shape):
    raw = encode_cursor(key)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", raw)          # URL-safe, no padding
    assert decode_cursor(raw, shape) == key


S, RANK = (str,), (float, str, int)


@pytest.mark.parametrize("raw,shape", [
    ("garbage", S), ("", S), ("!!!!", S), ("////", S), ("eyJh", S), ("W10", S), (encode_cursor([1]), S),
    (encode_cursor(["a", "b"]), S), (encode_cursor({"a": 1}), S), (encode_cursor([True]), S),
    (encode_cursor([0.5, "a", True]), RANK), (encode_cursor([1, "a", 2]), RANK), (encode_cursor(["a"]), RANK)])
def test_any_other_cursor_is_a_400(raw, shape):
    with pytest.raises(HTTPException) as e:
        decode_cursor(raw, shape)
    assert e.value.status_code == 400


def test_after_cursor_continues_after_the_item_or_below_its_relevance():
    r = [SimpleNamespace(sae="s", index=i, relevance=rel) for i, rel in enumerate([0.5, 0.4, 0.4, 0.2])]
    assert [x.index for x in after_cursor(r, [0.4, "s", 1])] == [2, 3]
    # the item is gone (the catalog changed): everything less relevant than it
    assert [x.index for x in after_cursor(r, [0.4, "s", 99])] == [3]
    assert after_cursor(r, [0.2, "s", 3]) == []


def settings(write=None, read=None) -> Settings:
    return Settings(interp_api_token=SecretStr(write) if write is not None else None,
                       interp_api_read_token=SecretStr(read) if read is not None else None)


def bearer(token):
    return Headers({"authorization": f"Bearer {token}"})


NONE = Headers({})


def test_writes_need_the_write_token_and_are_disabled_without_one():
    for s in (settings(), settings(write="")):
        assert auth_problem(s, "POST", "/jobs", bearer("x"), None)[0] == 403
    s = settings(write="w")
    assert auth_problem(s, "POST", "/jobs", bearer("w"), None) is None
    for headers, cookie in ((NONE, None), (bearer("x"), None), (NONE, "w"),
                            (Headers({"authorization": "Basic w"}), None), (Headers({"authorization": "Bearer"}), None),
                            (bearer("wé"), None)):
        assert auth_problem(s, "POST", "/jobs", headers, cookie) == (401, "unauthorized")
    # any method but a read is a write, whatever the path
    assert auth_problem(s, "DELETE", "/saes", NONE, None)[0] == 401


def test_reads_are_open_unless_a_read_token_is_set():
    assert auth_problem(settings(write="w"), "GET", "/saes", NONE, None) is None
    s = settings(write="w", read="r")
    assert auth_problem(s, "GET", "/saes", NONE, None) == (401, "unauthorized")
    assert auth_problem(s, "GET", "/saes", bearer("x"), "y") == (401, "unauthorized")
    for headers, cookie in ((bearer("r"), None), (NONE, "r"), (bearer("w"), None)):
        assert auth_problem(s, "GET", "/saes", headers, cookie) is None
    for path in ("/static/app.js", "/login", "/docs", "/openapi.json"):
        assert auth_problem(s, "GET", path, NONE, None) is None


def test_tokens_show_as_running_text():
    assert shown_tokens(["the", "cat", "##s", "sat"]) == [" the", " cat", "s", " sat"]
    assert shown_tokens(["[CLS]", "hello"]) == [" [CLS]", " hello"]       # WordPiece with no continuation
    assert shown_tokens(["The", " cat", " sat"]) == ["The", " cat", " sat"]   # byte-level BPE keeps its spaces


def test_snippet_tints_by_activation_escapes_tokens_and_gives_values_on_hover():
    e = Example(token_ids=[1, 2, 3], acts=[0.0, 1.0, 4.0])
    html = snippet_html(e, [" <b>", " x", " &"], max_act=4.0)
    spans = re.findall(r'<span class="tok( on)?"( style="background:rgba\(255,128,0,([\d.]+)\)")? title="([^"]+)">'
                       r'([^<]*)</span>', html)
    assert [(on, alpha, title, text) for on, _, alpha, title, text in spans] == [
        ("", "", "0", " &lt;b&gt;"), (" on", "0.33", "1", " x"), (" on", "1.00", "4", " &amp;")]
    assert "<b>" not in html


def test_histogram_bars_are_log_scaled_with_range_and_count_on_hover():
    svg = histogram_svg([0, 1, 1000, 10], 2.0)
    bars = re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"><title>([^<]+)</title>', svg)
    assert [t for _, t in bars] == ["(0, 0.5]: 0", "(0.5, 1]: 1", "(1, 1.5]: 1,000", "(1.5, 2]: 10"]
    heights = [float(h) for h, _ in bars]
    assert heights[0] == 0 and heights[2] == HIST_H
    assert heights[1] == pytest.approx(HIST_H * math.log(2) / math.log(1001), abs=0.1)
    assert heights[3] == pytest.approx(HIST_H * math.log(11) / math.log(1001), abs=0.1)
    assert "no histogram" in histogram_svg([], 1.0)
