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
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from interp.db import redact_url
from interp.settings import APISettings
from interp.store.features import FeatureView, feature_view
from interp.store.labels import LabelView
from interp.store.saes import list_saes
from sae.errors import InputError

log = logging.getLogger("interp.api")

MAX_NAME = 200
MAX_INDEX = 2**31 - 1           # features.idx is int4
MAX_CURSOR = 512
READS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = ("/static/", "/login", "/docs", "/openapi.json")   # served to anyone, read token or not
TOKEN_COOKIE = "interp_token"   # the read token, for pages a browser opens (a link cannot send a header)
UNAUTHORIZED = "unauthorized"   # the whole message: a caller without the token learns nothing more


# ---------------------------------------------------------------- input checks
def clean_text(s: str) -> str:
    """Text that Postgres can store: no NUL, valid UTF-8 (a JSON body can carry a lone surrogate)."""
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


def auth_problem(settings: APISettings, method: str, path: str, headers: Headers, cookie: str | None
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

    def __init__(self, app, settings: APISettings):
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


def install_errors(app: FastAPI, db_shown: str) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, e: InputError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(psycopg.OperationalError)
    async def db_down(request: Request, e: psycopg.OperationalError):
        log.warning("database error on %s %s: %s", request.method, request.url.path, type(e).__name__)
        return JSONResponse({"detail": f"the database at {db_shown} is not answering"}, status_code=503)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(settings: APISettings | None = None) -> FastAPI:
    """The app with its own pool over `settings.database_url` (opened at startup, closed at shutdown)."""
    settings = settings or APISettings()
    pool = ConnectionPool(settings.database_url, min_size=settings.api_pool_min, max_size=settings.api_pool_max,
                          kwargs={"autocommit": True, "connect_timeout": 5}, open=False, name="interp-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.open(wait=False)       # the server starts even while Postgres is down; requests then get 503
        yield
        pool.close()

    app = FastAPI(title="interp", summary="SAE feature catalog: search, features, labels, labelling jobs",
                  lifespan=lifespan)
    app.state.pool, app.state.pool_timeout_s = pool, 5.0
    app.state.db_shown = redact_url(settings.database_url)
    app.add_middleware(Guard, settings=settings)
    install_errors(app, app.state.db_shown)
    add_read_routes(app)
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
