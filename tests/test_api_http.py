"""The HTTP API against a real `interp serve` (uvicorn subprocess) over a small labelled catalog in the real
Postgres: listings and pagination, the feature endpoint, every bad input of the issue, auth on writes and
reads, and secrets kept out of bodies and logs."""
import html
import uuid

import httpx
import pytest

from interp.db import connect
from tests.api_catalog import READ_TOKEN, URL, WRITE_TOKEN, build_catalog, drop_catalog, drop_queue, server

DB_PASSWORD = "pw-" + uuid.uuid4().hex      # trust auth ignores it; it must still never show


def url_with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://root:{password}@{rest}"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    cat = build_catalog(tmp_path_factory.mktemp("api"))
    yield cat
    drop_catalog(cat)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("logs") / "serve.log"


@pytest.fixture(scope="module")
def api(catalog, log):
    """A server with a write token and a DATABASE_URL that carries a password."""
    with server(log, INTERP_API_TOKEN=WRITE_TOKEN, DATABASE_URL=url_with_password(URL, DB_PASSWORD)) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client


@pytest.fixture
def extra_saes():
    """Three bare SAE rows, so a listing has pages to turn."""
    names = [f"apitest_page_{uuid.uuid4().hex[:6]}_{c}" for c in "abc"]
    with connect(URL) as conn:
        for n in names:
            conn.execute("INSERT INTO saes (name, model, layer, site, d_in, n_features, arch)"
                         " VALUES (%s, 'minilm', 1, 'resid', 384, 8, 'topk')", (n,))
    yield names
    with connect(URL) as conn:
        conn.execute("DELETE FROM saes WHERE name = ANY(%s)", (names,))


def test_saes_pages_by_cursor_visit_every_sae_once_in_name_order(api, catalog, extra_saes):
    seen, cursor = [], None
    for _ in range(100):
        r = api.get("/saes", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 1
        seen += [s["name"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert set(extra_saes) | {catalog.name} <= set(seen)
    whole = api.get("/saes", params={"limit": 500}).json()
    assert [s["name"] for s in whole["items"]] == seen and whole["next_cursor"] is None


def test_feature_has_stats_histogram_split_snippets_and_every_label_with_scores(api, catalog):
    f = catalog.labelled[0]
    r = api.get(f"/saes/{catalog.name}/features/{f}")
    assert r.status_code == 200, r.text
    v = r.json()
    assert (v["sae"], v["index"]) == (catalog.name, f)
    assert 0 < v["density"] <= 1 and v["max_act"] > 0 and len(v["hist"]) == 50 and sum(v["hist"]) > 0
    assert v["explain"] and v["score"]
    for e in v["explain"] + v["score"]:
        assert len(e["tokens"]) == len(e["acts"]) and max(e["acts"]) == pytest.approx(e["max_act"], rel=1e-3)
    # held out by construction: no snippet is in both sets
    assert not {tuple(e["tokens"]) for e in v["explain"]} & {tuple(e["tokens"]) for e in v["score"]}
    labels = {(lab["explainer"], lab["label"]): lab for lab in v["labels"]}
    assert {s["scorer"]: s["value"] for s in labels[("baseline", catalog_label(0))]["scores"]} == \
           {"embedding": pytest.approx(0.9)}
    assert labels[("openai:stub", catalog_label(0))]["scores"][0]["method"] == "logprobs"
    failed = api.get(f"/saes/{catalog.name}/features/{catalog.labelled[1]}").json()["labels"]
    assert any(lab["label"] is None and lab["failure"] == "refusal" for lab in failed)


def catalog_label(i: int) -> str:
    from tests.api_catalog import LABELS

    return LABELS[i]


BAD_READS = [
    ("/saes/{sae}/features/-1", {}, 422),
    ("/saes/{sae}/features/999999", {}, 404),
    ("/saes/{sae}/features/99999999999999", {}, 422),
    ("/saes/{sae}/features/abc", {}, 422),
    ("/saes/no_such_sae/features/0", {}, 404),
    ("/saes/x' OR '1'='1/features/0", {}, 404),
    ("/saes/x'; DROP TABLE saes; --/features/0", {}, 404),
    ("/saes/a%00b/features/0", {}, 422),
    ("/saes/" + "n" * 10_000 + "/features/0", {}, 422),
    ("/saes", {"limit": -1}, 422),
    ("/saes", {"limit": 0}, 422),
    ("/saes", {"limit": 10**12}, 422),
    ("/saes", {"limit": "ten"}, 422),
    ("/saes", {"cursor": "garbage"}, 400),
    ("/saes", {"cursor": "WzFd"}, 400),                 # base64 of [1]: a key of the wrong type
    ("/saes", {"cursor": "' OR 1=1 --"}, 400),
    ("/saes", {"cursor": "x" * 10_000}, 422),
]


@pytest.mark.parametrize("path,params,status", BAD_READS, ids=[f"{p[:40]}-{q}" for p, q, _ in BAD_READS])
def test_bad_reads_get_the_4xx_that_says_why(api, catalog, path, params, status):
    r = api.get(path.format(sae=catalog.name), params=params)
    assert r.status_code == status, r.text
    assert r.json()["detail"] and "Traceback" not in r.text
    with connect(URL) as conn:   # the injection strings did nothing
        assert conn.execute("SELECT count(*) FROM saes WHERE name = %s", (catalog.name,)).fetchone()[0] == 1


def job_rows() -> int:
    with connect(URL) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {WRITE_TOKEN}"},
                                     {"Authorization": f"Bearer {WRITE_TOKEN}x"}, {"Authorization": "Bearer"},
                                     {"Cookie": f"interp_token={WRITE_TOKEN}"}])
@pytest.mark.parametrize("body", [b'{"sae": "%s", "features": "0:4"}', b"{not json", b"[]"])
def test_writes_without_the_token_get_401_no_hint_and_no_job(api, catalog, headers, body):
    before = job_rows()
    for path in ("/jobs", "/jobs/1/cancel"):
        r = api.post(path, content=body.replace(b"%s", catalog.name.encode()),
                     headers={"Content-Type": "application/json", **headers})
        assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}
        assert r.headers["www-authenticate"] == "Bearer"
    assert job_rows() == before


def test_with_no_write_token_set_writes_are_disabled_not_open(catalog, tmp_path):
    with server(tmp_path / "log") as base:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = httpx.post(base + "/jobs", json={"sae": catalog.name, "features": "0:2"}, headers=headers)
            assert r.status_code == 403 and "writes are disabled" in r.json()["detail"]
        assert httpx.get(base + "/saes").status_code == 200        # reads stay open


def test_read_token_guards_reads_by_header_or_cookie_and_leaves_docs_open(catalog, tmp_path):
    with server(tmp_path / "log", INTERP_API_READ_TOKEN=READ_TOKEN, INTERP_API_TOKEN=WRITE_TOKEN) as base:
        path = f"{base}/saes/{catalog.name}/features/{catalog.labelled[0]}"
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Cookie": "interp_token=nope"}):
            r = httpx.get(path, headers=headers)
            assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}
        for headers in ({"Authorization": f"Bearer {READ_TOKEN}"}, {"Cookie": f"interp_token={READ_TOKEN}"},
                        {"Authorization": f"Bearer {WRITE_TOKEN}"}):
            assert httpx.get(path, headers=headers).status_code == 200
        assert httpx.get(base + "/openapi.json").status_code == 200
        assert httpx.get(base + "/static/app.js").status_code == 200
        page = httpx.get(base + "/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login"
        # the read token does not write
        r = httpx.post(base + "/jobs", json={"sae": catalog.name}, headers={"Authorization": f"Bearer {READ_TOKEN}"})
        assert r.status_code == 401


def test_database_down_is_a_503_naming_the_redacted_url(tmp_path):
    dead = url_with_password("postgresql://127.0.0.1:1/nowhere", DB_PASSWORD)
    with server(tmp_path / "log", DATABASE_URL=dead) as base:
        r = httpx.get(base + "/saes", timeout=30)
    assert r.status_code == 503 and "127.0.0.1:1/nowhere" in r.json()["detail"] and "***" in r.json()["detail"]
    assert DB_PASSWORD not in r.text and DB_PASSWORD not in (tmp_path / "log").read_text()


def test_tokens_and_password_never_in_bodies_or_logs(api, catalog, log):
    bodies = [api.get("/saes").text, api.get("/openapi.json").text, api.get("/").text,
              api.get(f"/saes/{catalog.name}/features/0").text, api.get("/saes/nope/features/0").text,
              api.post("/jobs", json={"sae": "nope"}, headers={"Authorization": f"Bearer {WRITE_TOKEN}x"}).text,
              api.post("/jobs", content=b"{", headers={"Authorization": f"Bearer {WRITE_TOKEN}"}).text]
    text = "\n".join(bodies) + log.read_text()
    assert "GET /saes" in log.read_text()          # the log is the server's, and it logged these requests
    for secret in (WRITE_TOKEN, DB_PASSWORD):
        assert secret not in text


# ---------------------------------------------------------------- jobs
AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}


@pytest.fixture
def queue_cleanup():
    yield
    drop_queue()


def test_a_job_queues_shows_lists_and_cancels_like_the_cli(api, catalog, queue_cleanup):
    r = api.post("/jobs", json={"sae": catalog.name, "features": "0:10", "scorers": ["embedding"]}, headers=AUTH)
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["sae"], job["state"], job["n_items"], job["explainer"]) == (catalog.name, "queued", 10, "baseline")
    assert api.get(f"/jobs/{job['job_id']}").json()["n_items"] == 10
    assert job["job_id"] in [j["job_id"] for j in api.get("/jobs").json()["items"]]
    r = api.post(f"/jobs/{job['job_id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    again = api.post(f"/jobs/{job['job_id']}/cancel", headers=AUTH)
    assert again.status_code == 409 and "cancelled already" in again.json()["detail"]
    assert api.get("/jobs/999999999").status_code == 404
    assert api.post("/jobs/999999999/cancel", headers=AUTH).status_code == 404


BAD_JOBS = [
    (b"{not json", 422), (b"[]", 422), (b"{}", 422), (b'{"sae": "%s", "features": "0:4", "bogus": 1}', 422),
    (b'{"sae": "%s", "features": null}', 400), (b'{"sae": null, "features": "0:4"}', 422),
    (b'{"sae": "%s", "features": "9:4"}', 400), (b'{"sae": "%s", "features": "0:999999"}', 400),
    (b'{"sae": "%s", "features": "a:b"}', 400), (b'{"sae": "%s"}', 400),
    (b'{"sae": "%s", "features": "0:4", "unlabeled": true}', 400),
    (b'{"sae": "%s", "features": "0:4", "scorers": []}', 422),
    (b'{"sae": "%s", "features": "0:4", "scorers": ["x"]}', 400),
    (b'{"sae": "%s", "features": "0:4", "budget_tokens": -5}', 422),
    (b'{"sae": "%s", "features": "0:4", "explainer": "nonsense:model"}', 400),
    (b'{"sae": "no_such_sae", "features": "0:4"}', 400),
    (b'{"sae": "x\'; DROP TABLE jobs; --", "features": "0:4"}', 400),
    (b'{"sae": "a\\u0000b", "features": "0:4"}', 422), (b'{"sae": "\\ud800", "features": "0:4"}', 422),
]


@pytest.mark.parametrize("body,status", BAD_JOBS, ids=[b.decode()[:40] for b, _ in BAD_JOBS])
def test_malformed_job_bodies_get_4xx_and_write_no_job(api, catalog, body, status):
    before = job_rows()
    r = api.post("/jobs", content=body.replace(b"%s", catalog.name.encode()),
                 headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == status, r.text
    assert r.json()["detail"] and job_rows() == before


# ---------------------------------------------------------------- search and export
def test_search_pages_by_cursor_match_one_long_page(api, catalog):
    params = {"q": "numbers", "sae": catalog.name}
    whole = api.get("/features", params={**params, "limit": 100}).json()
    assert whole["next_cursor"] is None and len(whole["items"]) >= 2        # two explainers labelled it
    assert any(h["label"] == catalog_label(0) and h["index"] == catalog.labelled[0] for h in whole["items"])
    seen, cursor = [], None
    while True:
        page = api.get("/features", params={**params, "limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [(h["sae"], h["index"], h["label"]) for h in seen] == \
           [(h["sae"], h["index"], h["label"]) for h in whole["items"]]


BAD_SEARCHES = [
    ({"q": "' OR 1=1; DROP TABLE explanations; --"}, 200), ({"q": "x" * 10_000}, 422), ({"q": ""}, 422), ({}, 422),
    ({"q": "the", "limit": -1}, 422), ({"q": "the", "limit": 0}, 422), ({"q": "the", "cursor": "garbage"}, 400),
    ({"q": "the", "cursor": "WyJhIiwxLDJd"}, 400), ({"q": "the", "sae": "no_such_sae"}, 400),
    ({"q": "the", "scorer": "bogus"}, 400), ({"q": "the", "min_score": "nan"}, 422),
    ({"q": "the", "density": "x"}, 400),
    ({"q": "%%%___\\\\"}, 200), ({"q": "a\x00b"}, 422),
]


@pytest.mark.parametrize("params,status", BAD_SEARCHES, ids=[str(p)[:40] for p, _ in BAD_SEARCHES])
def test_bad_searches_get_4xx_or_an_empty_result(api, catalog, params, status):
    # within this test's SAE, whose few labels none of these match (other SAEs in the database may)
    r = api.get("/features", params={"sae": catalog.name, **params})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["items"] == [] and r.json()["next_cursor"] is None
    else:
        assert r.json()["detail"]
    with connect(URL) as conn:
        assert conn.execute("SELECT count(*) FROM explanations e JOIN saes s ON s.id = e.sae_id WHERE s.name = %s",
                            (catalog.name,)).fetchone()[0] == 5


def test_export_streams_each_format_as_interp_export_writes_it(api, catalog, tmp_path):
    import io
    import json
    import tarfile

    import pyarrow.parquet as pq

    with api.stream("GET", f"/saes/{catalog.name}/export", params={"format": "jsonl"}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in r.headers        # streamed, not buffered
        rows = [json.loads(line) for line in r.iter_lines() if line]
    assert [f["index"] for f in rows] == list(range(catalog.n_features))
    first = next(f for f in rows if f["index"] == catalog.labelled[0])
    assert {e["label"] for e in first["explanations"]} == {catalog_label(0)}
    scored = api.get(f"/saes/{catalog.name}/export", params={"format": "jsonl", "min_score": 0.85}).text
    assert [json.loads(line)["index"] for line in scored.splitlines()] == [catalog.labelled[0]]
    r = api.get(f"/saes/{catalog.name}/export", params={"format": "parquet"})
    assert r.status_code == 200 and pq.read_table(io.BytesIO(r.content)).num_rows == catalog.n_features
    r = api.get(f"/saes/{catalog.name}/export", params={"format": "csv"})
    assert r.text.splitlines()[0].startswith("sae,index,density") and catalog_label(1) in r.text
    r = api.get(f"/saes/{catalog.name}/export", params={"format": "neuronpedia"})
    names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
    assert any(n.endswith("explanations/batch-0.jsonl.gz") for n in names)
    for params, status in (({"format": "xml"}, 422), ({"scorer": "bogus"}, 400), ({"min_score": "inf"}, 422)):
        assert api.get(f"/saes/{catalog.name}/export", params=params).status_code == status
    assert api.get("/saes/no_such_sae/export").status_code == 404


@pytest.mark.parametrize("args,message", [(["--port", "0"], "--port must be 1..65535"),
                                          (["--port", "70000"], "--port must be 1..65535"),
                                          (["--workers", "0"], "--workers must be at least 1")])
def test_serve_bad_flags_are_one_error_line(args, message):
    import subprocess
    import sys

    from tests.api_catalog import ROOT, child_env

    r = subprocess.run([sys.executable, "-m", "interp.cli", "serve", *args], cwd=ROOT, env=child_env({}),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}, got {args[1]}" and "Traceback" not in r.stderr


def test_pooled_connections_killed_under_the_server_are_replaced_not_a_503(api, catalog):
    assert api.get("/saes").status_code == 200
    with connect(URL) as conn:
        killed = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                              " WHERE application_name = 'interp-api' AND datname = current_database()").fetchone()[0]
    assert killed >= 1
    for _ in range(3):
        assert api.get(f"/saes/{catalog.name}/features/{catalog.labelled[0]}").status_code == 200


def test_dashboard_pages_answer_errors_as_escaped_html(api, catalog):
    r = api.get("/ui/saes/<i>x/features/0")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "&#x27;&lt;i&gt;x&#x27;" in r.text and "<i>" not in r.text
    r = api.get(f"/ui/saes/{catalog.name}/features/-1")
    assert r.status_code == 422 and "greater than or equal to 0" in r.text
    assert api.get("/saes/nope/features/0").headers["content-type"] == "application/json"


def test_promoted_and_suppressed_tokens_show_where_known(api, catalog):
    f = catalog.labelled[2]
    with connect(URL) as conn:   # MiniLM is not causal, so the harvest stored none: write some as a causal LM's would
        conn.execute("UPDATE features SET top_logits = %s, bottom_logits = %s WHERE idx = %s"
                     " AND sae_id = (SELECT id FROM saes WHERE name = %s)", ([2000, 2001], [2002], f, catalog.name))
        vocab = dict(conn.execute("SELECT token_id, token FROM vocab WHERE token_id = ANY(%s) AND tokenizer ="
                                  " (SELECT tokenizer FROM saes WHERE name = %s)", ([2000, 2001, 2002], catalog.name)))
    v = api.get(f"/saes/{catalog.name}/features/{f}").json()
    assert v["promoted"] == [vocab[2000], vocab[2001]] and v["suppressed"] == [vocab[2002]]
    page = api.get(f"/ui/saes/{catalog.name}/features/{f}").text
    assert "promotes:" in page and html.escape(repr(vocab[2001])) in page
    assert "promotes:" not in api.get(f"/ui/saes/{catalog.name}/features/{catalog.labelled[0]}").text
