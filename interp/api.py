"""The HTTP API (`interp serve`): FastAPI over the same store functions as the CLI, one connection pool, tokens
on writes (and on reads when a read token is set), and the dashboard's pages (`interp.web`).

Every bad input is a 4xx with one clear line: parameters and bodies are pydantic models with bounds, text that
Postgres cannot hold (NUL, lone surrogates) is refused at the edge, and `InputError` from the store maps to 400
or 404. Only a bug answers 500, and then with no detail; a database that cannot be reached answers 503 with its
URL redacted. Tokens are compared in constant time and never echoed or logged.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any, Literal
from urllib.parse import quote

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from interp.db import redact_url
from interp.export import export, feature_dict
from interp.labelling import LabelRequest, broker_app, queue_job
from interp.search import MAX_LIMIT, SearchResult, check_scorer, search
from interp.settings import Settings
from interp.store.export import stream_features
from interp.store.features import FeatureView, feature_view
from interp.store.jobs import JobSummary, cancel, summaries
from interp.store.labels import LabelView
from interp.store.saes import list_saes, require_sae
from interp.store.search import Filters
from sae.errors import InputError

log = logging.getLogger("interp.api")

MAX_NAME = 200
MAX_INDEX = 2**31 - 1           # features.idx is int4
MAX_CURSOR = 512
READS = frozenset({"GET", "HEAD", "OPTIONS"})
DOCS_STATIC = "/docs-static"     # Swagger UI's script and styles: a path under "/docs", so open like it
OPEN_PATHS = ("/static/", "/login", "/docs", "/openapi.json")   # served to anyone, read token or not
TOKEN_COOKIE = "interp_token"   # the read token, for pages a browser opens (a link cannot send a header)
APP_NAME = "interp-api"         # the pool's connections in pg_stat_activity
UNAUTHORIZED = "unauthorized"   # the whole message: a caller without the token learns nothing more


# ---------------------------------------------------------------- input checks
def clean_text(s: str | None) -> str | None:
    """Text that Postgres can store: no NUL, valid UTF-8 (a JSON body can carry a lone surrogate). None passes:
    the optional fields wrap their whole `str | None` in this check, and a body may say null."""
    if s is None:
        return s
    if "\x00" in s:
        raise ValueError("must not contain NUL characters")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return s


Text = AfterValidator(clean_text)
SAEName = Annotated[str, Path(min_length=1, max_length=MAX_NAME, description="the SAE's catalog name"), Text]
FeatureIndex = Annotated[int, Path(ge=0, le=MAX_INDEX, description="feature index")]


class PageParams(BaseModel):
    """Keyset pagination: `cursor` is the opaque `next_cursor` of the previous page."""
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=500)
    cursor: Annotated[str | None, Field(max_length=MAX_CURSOR), Text] = None


def encode_cursor(key: list[Any]) -> str:
    """The position after the last item of a page, opaque to clients (they pass it back unchanged)."""
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).rstrip(b"=").decode()


def decode_cursor(raw: str, shape: tuple[type, ...]) -> list[Any]:
    """The key that `encode_cursor` made, checked against the types this listing's keys have; anything else
    (a cursor of another listing, an edited or truncated one) is a 400, never a query."""
    try:
        key = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        ok = (isinstance(key, list) and len(key) == len(shape)
              and all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(key, shape)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        ok = False
    if not ok:
        raise HTTPException(400, "the cursor is not one this listing issued; start again without it")
    return key


# ---------------------------------------------------------------- response records
class SAEOut(BaseModel):
    name: str
    model: str
    layer: int
    site: str
    d_in: int
    n_features: int
    arch: str
    k: int | None
    metrics: dict
    harvest: dict
    created: str


class SAEPage(BaseModel):
    items: list[SAEOut]
    next_cursor: str | None


class ExampleOut(BaseModel):
    kind: str
    quantile_bin: int | None
    max_act: float
    tokens: list[str]
    acts: list[float]


class FeatureOut(BaseModel):
    """One feature as the feature page shows it; `explain` and `score` are disjoint snippet sets (the
    explainer saw the first, the scorers the second)."""
    sae: str
    index: int
    density: float
    n_fired: int
    max_act: float
    mean_act: float
    hist: list[int] = Field(description="counts in equal-width bins over (0, hist_max]")
    hist_max: float
    promoted: list[str] | None = Field(description="tokens the decoder direction promotes (causal LMs)")
    suppressed: list[str] | None
    explain: list[ExampleOut]
    score: list[ExampleOut]
    labels: list[LabelView]

    @classmethod
    def of(cls, v: FeatureView) -> "FeatureOut":
        def out(split: str) -> list[ExampleOut]:
            return [ExampleOut(kind=e.kind, quantile_bin=e.quantile_bin, max_act=e.max_act,
                               acts=[round(a, 4) for a in e.acts],
                               tokens=e.tokens or [f"<{t}>" for t in e.token_ids])
                    for e in v.examples.examples if e.split == split]

        return cls(sae=v.sae, index=v.index, density=v.density, n_fired=v.n_fired, max_act=v.max_act,
                   mean_act=v.mean_act, hist=v.hist, hist_max=v.hist_max, promoted=v.top_logits,
                   suppressed=v.bottom_logits, explain=out("explain"), score=out("score"), labels=v.labels)


# ---------------------------------------------------------------- auth
def bearer(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison (as bytes: compare_digest refuses non-ASCII str)."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def auth_problem(settings: Settings, method: str, path: str, headers: Headers, cookie: str | None
                 ) -> tuple[int, str] | None:
    """(status, message) when the request may not go on, None when it may. Writes take the bearer header only
    (a cookie would let another site's form write); reads also take the cookie that /login sets."""
    if method not in READS:
        write = settings.write_token()
        if write is None:
            return 403, "writes are disabled: the server was started without INTERP_API_TOKEN"
        return None if same(bearer(headers), write) else (401, UNAUTHORIZED)
    read = settings.read_token()
    if read is None or path.startswith(OPEN_PATHS):
        return None
    given = [bearer(headers), cookie]
    expected = [t for t in (read, settings.write_token()) if t]
    return None if any(same(g, t) for g in given for t in expected) else (401, UNAUTHORIZED)


class Guard:
    """Auth as ASGI middleware, so it runs before a body is read or validated: a write without the token gets
    401 whatever its body holds."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            cookie = Request(scope).cookies.get(TOKEN_COOKIE)
            problem = auth_problem(self.settings, scope["method"], scope["path"], headers, cookie)
            if problem is not None:
                await refusal(problem, scope["method"], headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def refusal(problem: tuple[int, str], method: str, headers: Headers):
    status, message = problem
    if status == 401 and method == "GET" and "text/html" in headers.get("accept", ""):
        return RedirectResponse("/login", status_code=303)
    extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=extra)


# ---------------------------------------------------------------- the app
def conn(request: Request):
    """A pooled autocommit connection for one request; a database that cannot be reached is a 503."""
    try:
        with request.app.state.pool.connection(timeout=request.app.state.pool_timeout_s) as c:
            yield c
    except PoolTimeout:
        raise HTTPException(503, f"the database at {request.app.state.db_shown} is not answering") from None


Conn = Annotated[psycopg.Connection, Depends(conn)]


def answer(request: Request, status: int, detail: str, headers: dict | None = None):
    """An error as JSON for the API, as a small HTML page for the dashboard's pages."""
    if request.url.path == "/" or request.url.path.startswith("/ui/"):
        from interp.web import error_page

        return error_page(status, detail)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def install_errors(app: FastAPI, db_shown: str) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return answer(request, e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return answer(request, 422, "; ".join(lines))

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError):
        return answer(request, 400, str(e))

    @app.exception_handler(psycopg.errors.QueryCanceled)
    async def too_slow(request: Request, e: psycopg.errors.QueryCanceled):
        log.warning("query cancelled on %s %s", request.method, request.url.path)
        return answer(request, 503, "the query took too long and was cancelled; try a narrower one")

    @app.exception_handler(psycopg.OperationalError)
    async def db_down(request: Request, e: psycopg.OperationalError):
        log.warning("database error on %s %s: %s", request.method, request.url.path, type(e).__name__)
        return answer(request, 503, f"the database at {db_shown} is not answering")

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(request, 500, "internal error")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app with its own pool over `settings.database_url` (opened at startup, closed at shutdown)."""
    settings = settings or Settings()
    # check_connection costs one round trip per request and turns a Postgres restart into a fresh connection
    # instead of one failed request per pooled connection
    pool = ConnectionPool(settings.database_url, min_size=settings.api_pool_min, max_size=settings.api_pool_max,
                          kwargs={"autocommit": True, "connect_timeout": 5, "application_name": APP_NAME},
                          open=False, name=APP_NAME,
                          check=ConnectionPool.check_connection)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.open(wait=False)       # the server starts even while Postgres is down; requests then get 503
        yield
        pool.close()

    # FastAPI's own /docs loads Swagger UI from a CDN, which a lab's offline box cannot reach; fastapi-offline
    # serves it from files in its wheel. No /redoc: ReDoc still fetches its logo from a CDN.
    app = FastAPIOffline(title="interp", summary="SAE feature catalog: search, features, labels, labelling jobs",
                         lifespan=lifespan, static_url=DOCS_STATIC, redoc_url=None)
    app.state.pool, app.state.pool_timeout_s = pool, 5.0
    app.state.db_shown = redact_url(settings.database_url)
    app.add_middleware(Guard, settings=settings)
    install_errors(app, app.state.db_shown)
    add_read_routes(app)
    add_search_route(app)
    add_job_routes(app)
    add_export_route(app)
    app.mount("/static", StaticFiles(directory=str(files("interp") / "static")), name="static")
    from interp import web

    web.add_pages(app)
    return app


def add_read_routes(app: FastAPI) -> None:
    @app.get("/saes", response_model=SAEPage, tags=["catalog"])
    def saes(c: Conn, page: Annotated[PageParams, Query()]) -> SAEPage:
        """The SAEs in the catalog, by name."""
        after = decode_cursor(page.cursor, (str,))[0] if page.cursor else None
        # a catalog holds tens of SAEs, not millions: list_saes reads them all and the page is cut here
        rows = [s for s in list_saes(c) if after is None or s.name > after]
        items = [SAEOut(**{f: getattr(s, f) for f in SAEOut.model_fields}) for s in rows[:page.limit]]
        more = len(rows) > page.limit
        return SAEPage(items=items, next_cursor=encode_cursor([items[-1].name]) if more else None)

    @app.get("/saes/{name}/features/{idx}", response_model=FeatureOut, tags=["catalog"],
             responses={404: {"description": "no such SAE or feature"}})
    def feature(c: Conn, name: SAEName, idx: FeatureIndex) -> FeatureOut:
        """Stats, histogram, promoted and suppressed tokens, the explain and score snippets, and every label
        with its scores."""
        try:
            return FeatureOut.of(feature_view(c, name, idx))
        except InputError as e:
            raise HTTPException(404, str(e)) from None


# ---------------------------------------------------------------- search (interp.search, as `interp search`)
class SearchParams(PageParams):
    q: Annotated[str, Field(min_length=1, max_length=1000, description="label text (websearch syntax)"), Text]
    sae: Annotated[str | None, Field(max_length=MAX_NAME), Text] = None
    scorer: Annotated[str | None, Field(max_length=64), Text] = None
    min_score: float | None = Field(None, allow_inf_nan=False)
    density: Annotated[str | None, Field(max_length=64, description="A:B, either side open"), Text] = None
    limit: int = Field(20, ge=1, le=100)


def after_cursor(results: list, key: list[Any]) -> list:
    """The results after the cursor's (relevance, sae, index): after that item when it is still in the
    ranking, else after every result at least as relevant (the catalog changed between pages)."""
    rel, sae, idx = key
    for i, r in enumerate(results):
        if (r.sae, r.index) == (sae, idx):
            return results[i + 1:]
    return [r for r in results if r.relevance < rel]


class SearchPage(BaseModel):
    items: list[SearchResult]
    next_cursor: str | None


def add_search_route(app: FastAPI) -> None:
    @app.get("/features", response_model=SearchPage, tags=["search"])
    def features(c: Conn, p: Annotated[SearchParams, Query()]) -> SearchPage:
        """Labels matching `q` (full text, trigram and semantic arms fused by reciprocal rank), best first: the
        same results as `interp search`. The fused ranking is bounded (each arm returns at most a few hundred
        candidates), so a page is cut from it by the cursor's key, never by an offset into the catalog."""
        key = decode_cursor(p.cursor, (float, str, int)) if p.cursor else None
        ranked = search(c, p.q, sae=p.sae, scorer=p.scorer, min_score=p.min_score, density=p.density,
                        limit=MAX_LIMIT, warn=log.info)
        rest = after_cursor(ranked, key) if key else ranked
        items = rest[:p.limit]
        last = items[-1] if items else None
        more = len(rest) > p.limit
        return SearchPage(items=items, next_cursor=encode_cursor([last.relevance, last.sae, last.index]) if more
                          else None)


# ---------------------------------------------------------------- labelling jobs (interp.labelling, as `interp label`)
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="job id")]
Spec = Annotated[str, Field(min_length=1, max_length=200), Text]


class JobRequest(BaseModel):
    """The body of POST /jobs: the flags of `interp label`."""
    model_config = ConfigDict(extra="forbid")
    sae: Annotated[str, Field(min_length=1, max_length=MAX_NAME), Text]
    features: Annotated[str | None, Field(max_length=64, description="A:B, half-open"), Text] = None
    unlabeled: bool = False
    explainer: Spec = "baseline"
    simulator: Spec | None = None
    scorers: list[Annotated[str, Field(min_length=1, max_length=64), Text]] = Field(["embedding"], min_length=1,
                                                                                   max_length=8)
    budget_tokens: int | None = Field(None, ge=1, le=2**62)


class JobList(BaseModel):
    items: list[JobSummary]


def broker(app: FastAPI):
    """The Celery client that sends label_chunk tasks; made at the first POST /jobs (importing Celery is slow)."""
    if app.state.broker is None:
        app.state.broker = broker_app()
    return app.state.broker


def job_or_404(c: psycopg.Connection, job_id: int) -> JobSummary:
    found = summaries(c, job_id)
    if not found:
        raise HTTPException(404, f"no job {job_id}")
    return found[0]


def add_job_routes(app: FastAPI) -> None:
    app.state.broker = None

    @app.post("/jobs", response_model=JobSummary, status_code=201, tags=["jobs"],
              responses={401: {"description": "no or wrong bearer token"}, 403: {"description": "writes disabled"}})
    def queue(c: Conn, body: JobRequest, request: Request) -> JobSummary:
        """Queues labelling exactly as `interp label` does; needs the bearer token INTERP_API_TOKEN."""
        req = LabelRequest(sae=body.sae, features=body.features, unlabeled=body.unlabeled, explainer=body.explainer,
                           simulator=body.simulator, scorers=tuple(body.scorers), budget_tokens=body.budget_tokens)
        return queue_job(c, req, broker(request.app))

    @app.get("/jobs", response_model=JobList, tags=["jobs"])
    def recent(c: Conn, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobList:
        """The latest jobs, newest first."""
        return JobList(items=summaries(c, limit=limit))

    @app.get("/jobs/{job_id}", response_model=JobSummary, tags=["jobs"])
    def job(c: Conn, job_id: JobId) -> JobSummary:
        """A job's state and progress: items done and failed, failures by reason, tokens spent."""
        return job_or_404(c, job_id)

    @app.post("/jobs/{job_id}/cancel", response_model=JobSummary, tags=["jobs"],
              responses={409: {"description": "the job has ended already"}})
    def stop(c: Conn, job_id: JobId) -> JobSummary:
        """Stops a job: features in a worker finish, the rest stay pending (resume with `interp label --resume`)."""
        found = job_or_404(c, job_id)
        if cancel(c, job_id) is None:
            raise HTTPException(409, f"job {job_id} is {found.state} already; nothing to cancel")
        return job_or_404(c, job_id)


# ---------------------------------------------------------------- export (interp.export, as `interp export`)
MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet",
         "neuronpedia": "application/x-tar"}
SUFFIX = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "neuronpedia": "tar"}


class ExportParams(BaseModel):
    format: Literal["jsonl", "parquet", "csv", "neuronpedia"] = "jsonl"
    min_score: float | None = Field(None, allow_inf_nan=False)
    scorer: Annotated[str | None, Field(max_length=64), Text] = None
    with_examples: bool = False


def jsonl_lines(pool: ConnectionPool, name: str, sid: int, p: ExportParams) -> Iterator[str]:
    """The export's lines a batch at a time from a server-side cursor, on a connection of its own that the
    response holds while it streams."""
    with pool.connection() as c:
        for feats in stream_features(c, name, sid, Filters(scorer=p.scorer, min_score=p.min_score),
                                     with_examples=p.with_examples):
            yield "".join(json.dumps(feature_dict(f), ensure_ascii=False) + "\n" for f in feats)


def exported_file(c: psycopg.Connection, name: str, p: ExportParams, folder: str) -> str:
    """Formats that need the whole file first (parquet's footer, csv's scorer columns, Neuronpedia's folder,
    sent as one tar): written by `interp.export.export` into `folder`; returns the path to send."""
    out = os.path.join(folder, "export." + SUFFIX[p.format])
    target = os.path.join(folder, "neuronpedia") if p.format == "neuronpedia" else out
    export(c, name, p.format, target, min_score=p.min_score, scorer=p.scorer, with_examples=p.with_examples)
    if p.format == "neuronpedia":
        with tarfile.open(out, "w") as tar:     # its batch files are gzipped already
            tar.add(target, arcname=f"{name}-neuronpedia")
    return out


def add_export_route(app: FastAPI) -> None:
    @app.get("/saes/{name}/export", tags=["catalog"], response_class=StreamingResponse,
             responses={200: {"content": {m: {} for m in MEDIA.values()}}, 404: {"description": "no such SAE"}})
    def export_sae(c: Conn, name: SAEName, p: Annotated[ExportParams, Query()], request: Request):
        """The SAE's labelled catalog as `interp export` writes it, streamed: jsonl straight from the database
        cursor; parquet, csv and neuronpedia (a tar of its folder) once written."""
        try:
            sid = require_sae(c, name)
        except InputError as e:
            raise HTTPException(404, str(e)) from None
        check_scorer(p.scorer)
        headers = {"Content-Disposition": f'attachment; filename="{quote(name)}.{SUFFIX[p.format]}"'}
        if p.format == "jsonl":
            return StreamingResponse(jsonl_lines(request.app.state.pool, name, sid, p), media_type=MEDIA["jsonl"],
                                     headers=headers)
        folder = tempfile.mkdtemp(prefix="interp-export-")
        try:
            path = exported_file(c, name, p, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return FileResponse(path, media_type=MEDIA[p.format], headers=headers,
                            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))
