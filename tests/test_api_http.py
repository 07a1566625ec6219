"""The HTTP API against a real `interp serve` (uvicorn subprocess) over a small labelled catalog in the real
Postgres: listings and pagination, the feature endpoint, every bad input of the issue, auth on writes and
reads, and secrets kept out of bodies and logs."""
import uuid

import httpx
import pytest

from interp.db import connect
from tests.api_catalog import READ_TOKEN, URL, WRITE_TOKEN, build_catalog, drop_catalog, server

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
