"""The arena's web app (FastAPI): pages, the judging API, images by uid, and the admin routes.

Raters: ``GET /`` gives a rater id (a signed cookie) and a CSRF token bound to it; every POST
carries the token in ``X-CSRF-Token``. ``POST /api/pair`` serves a pair to judge (generate mode:
for the rater's prompt) and records it; ``POST /api/judge`` records a decision on a pair served to
that rater (once a pair; idempotent by the judgment uid the page makes) and, in generate mode,
answers with the pair that follows: the rejected image replaced by a new one, both after a tie.
``GET /images/<uid>.png`` serves stored images only. Admin: ``GET /admin/stats`` and
``GET /admin/export`` (a zip of the export) with ``Authorization: Bearer <token>``.

Every request, however malformed, gets an answer under 500 with a short JSON reason, and a
refused request stores nothing: 403 (no session, missing or forged CSRF token, no or a wrong
admin token), 404 (anything else, image names that are not uids included), 409 (a pair judged
already, a judgment uid used for another pair, a retry with another choice; an export missing a
judged image's file), 413 (a body over ``max_body_bytes``), 422 (a bad field, named without
echoing it: a prompt over ``max_prompt_chars``, with control characters or not valid Unicode; a
pair not served to this rater; a choice other than left/right/tie; a non-finite latency), 429
(over ``judgments_per_minute``; a second draw while one is drawn for the rater; more draws
waiting for the models than ``Painter.MAX_WAITING``). Text is normalised at this boundary
alone (``clean_prompt``), so SQLite and PostgreSQL store the same.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import hmac
import re
import secrets
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from pickalign.eval.arena.config import ArenaConfig
from pickalign.eval.arena.pairs import Busy, EvalPairs, Painter
from pickalign.eval.arena.store import (
    CHOICES,
    JudgmentConflict,
    count_judgments,
    open_engine,
    record_judgment,
    serve_pair,
    served_pair,
)

HERE = Path(__file__).parent
UID = re.compile(r"^[0-9a-f]{32}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason


class PairRequest(BaseModel):
    prompt: str | None = None


class JudgeRequest(BaseModel):
    # 32 hex digits, bare or as a canonical UUID: one stored uid per client uid
    uid: str = Field(pattern=r"^([0-9a-f]{32}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12})$")
    pair: str = Field(pattern=r"^[0-9a-f]{32}$")  # as /api/pair served it
    choice: str
    latency_ms: float = Field(ge=0, le=86_400_000, allow_inf_nan=False)


def same_token(given: str, expected: str) -> bool:
    """A constant-time comparison that cannot fail on encoding: what is not ASCII is no token."""
    return given.isascii() and hmac.compare_digest(given.encode(), expected.encode())


def clean_prompt(text: str, limit: int) -> str:
    """A prompt as stored and shown: NFC-normalised, whitespace runs as one space. Refused (422,
    naming the field, not echoing it): not valid Unicode (a lone surrogate), control characters
    (NUL included: PostgreSQL cannot store it), empty, or over ``limit`` characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(422, "prompt: not valid Unicode text") from None
    # before whitespace is collapsed: Python counts some control characters as whitespace
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        raise Refused(422, "prompt: control characters are not allowed")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text:
        raise Refused(422, "write a prompt first")
    if len(text) > limit:
        raise Refused(422, f"prompt over {limit} characters")
    return text


def validation_reason(error: RequestValidationError) -> str:
    """The first problem of a request that did not validate, naming the field but never
    repeating its value (which may not even be valid text)."""
    problems = error.errors()
    if not problems:
        return "the request did not validate"
    first = problems[0]
    field = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    message = str(first.get("msg", "invalid")).encode("ascii", "replace").decode()
    return f"{field}: {message}"[:200]


class BodyLimit:
    """Refuse a request body over ``limit`` bytes (413), by its header or as it streams: the
    body (small, by this very limit) is read here first and handed on only when it fits."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(self.limit)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(self.limit)(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int):
    return JSONResponse(
        {"error": f"request body over {limit} bytes"}, status_code=413, headers=SECURITY_HEADERS
    )


class RateLimit:
    """At most ``per_minute`` events per rater in any 60 seconds."""

    def __init__(self, per_minute: int):
        self.per_minute, self.events = per_minute, collections.defaultdict(collections.deque)
        self.lock = threading.Lock()
        self.pruned = time.monotonic()

    def check(self, rater: str) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.pruned > 60:  # raters quiet for a minute are forgotten
                quiet = [r for r, e in self.events.items() if not e or now - e[-1] > 60]
                for gone in quiet:
                    del self.events[gone]
                self.pruned = now
            events = self.events[rater]
            while events and now - events[0] > 60:
                events.popleft()
            if len(events) >= self.per_minute:
                raise Refused(429, f"rate limit: at most {self.per_minute} requests a minute")
            events.append(now)


def _secret(config: ArenaConfig) -> bytes:
    """The key that signs rater ids and CSRF tokens, kept beside the images across restarts."""
    path = Path(config.images_dir).parent / "arena_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return bytes.fromhex(path.read_text().strip())


def create_app(config: ArenaConfig, admin_token: str) -> FastAPI:
    Path(config.images_dir).mkdir(parents=True, exist_ok=True)
    engine = open_engine(config.database)
    key = _secret(config)
    source = Painter(config, engine) if config.mode == "generate" else EvalPairs(config, engine)
    limits = RateLimit(config.judgments_per_minute)
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescaped

    app = FastAPI(title=config.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def sign(value: str) -> str:
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()

    def rater_of(request: Request) -> str:
        cookie = request.cookies.get("rater", "")
        rater, _, signature = cookie.partition(".")
        if not rater or not rater.isascii() or not same_token(signature, sign("rater:" + rater)):
            raise Refused(403, "no rater session: load the arena page first")
        return rater

    def check_csrf(request: Request, rater: str) -> None:
        token = request.headers.get("x-csrf-token", "")
        if not same_token(token, sign("csrf:" + rater)):
            raise Refused(403, "missing or invalid CSRF token: reload the page")

    def check_admin(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not same_token(given.strip(), admin_token):
            raise Refused(403, "admin routes need Authorization: Bearer <admin token>")

    drawing, drawing_lock = set(), threading.Lock()

    @contextlib.contextmanager
    def one_draw_at_a_time(rater: str):
        """A rater waits for one pair at a time (the page never asks for two at once)."""
        with drawing_lock:
            if rater in drawing:
                raise Refused(429, "a pair is being drawn for you already: wait for it")
            drawing.add(rater)
        try:
            yield
        except Busy as busy:
            raise Refused(429, str(busy)) from None
        finally:
            with drawing_lock:
                drawing.discard(rater)

    def image_url(uid: str) -> dict:
        return {"uid": uid, "url": f"/images/{uid}.png"}

    def serve(rater: str, prompt: str, left: str, right: str) -> dict:
        """Record the pair as served to ``rater``; what the page shows of it."""
        pair = serve_pair(engine, rater, prompt, left, right)
        return {"pair": pair, "prompt": prompt, "left": image_url(left), "right": image_url(right)}

    @app.exception_handler(Refused)
    async def refused(_request, error: Refused):
        return JSONResponse({"error": error.reason}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        return JSONResponse({"error": validation_reason(error)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        # the framework's own refusals (no such route, wrong method, a body it cannot parse)
        # in the same shape as the arena's
        reason = str(error.detail).encode("ascii", "replace").decode()[:200]
        return JSONResponse({"error": reason}, status_code=error.status_code, headers=error.headers)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        try:
            rater = rater_of(request)
        except Refused:
            rater = secrets.token_hex(8)
        response = templates.TemplateResponse(
            request,
            "arena.html",
            {
                "title": config.title,
                "mode": config.mode,
                "csrf": sign("csrf:" + rater),
                "count": count_judgments(engine, rater),
                "max_prompt": config.max_prompt_chars,
            },
        )
        response.set_cookie(
            "rater",
            f"{rater}.{sign('rater:' + rater)}",
            httponly=True,
            samesite="strict",
            max_age=365 * 86400,
        )
        return response

    @app.post("/api/pair")
    def new_pair(request: Request, body: PairRequest):
        rater = rater_of(request)
        check_csrf(request, rater)
        limits.check(rater)
        if config.mode == "compare":
            return serve(rater, *source.pair())
        prompt = clean_prompt(body.prompt or "", config.max_prompt_chars)
        with one_draw_at_a_time(rater):
            return serve(rater, prompt, source.draw(prompt), source.draw(prompt))

    @app.post("/api/judge")
    def judge(request: Request, body: JudgeRequest):
        rater = rater_of(request)
        check_csrf(request, rater)
        limits.check(rater)
        if body.choice not in CHOICES:
            raise Refused(422, f"choice must be one of {', '.join(CHOICES)}")
        pair = served_pair(engine, body.pair, rater)
        if pair is None:
            raise Refused(422, "pair: not a pair served to you; ask /api/pair for one")
        decided = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        try:
            created, judgment_id = record_judgment(
                engine,
                pair,
                uid=body.uid.replace("-", ""),
                mode=config.mode,
                choice=body.choice,
                shown_at=decided - datetime.timedelta(milliseconds=body.latency_ms),
                decided_at=decided,
                latency_ms=body.latency_ms,
            )
        except JudgmentConflict as conflict:
            raise Refused(409, str(conflict)) from None
        answer = {"id": judgment_id, "duplicate": not created}
        answer["count"] = count_judgments(engine, rater)
        if config.mode == "generate":  # a retried request's answer carries a next pair too
            with one_draw_at_a_time(rater):
                left = pair.left_uid if body.choice == "left" else source.draw(pair.prompt)
                right = pair.right_uid if body.choice == "right" else source.draw(pair.prompt)
                answer["next"] = serve(rater, pair.prompt, left, right)
        return answer

    @app.get("/images/{name}")
    def image(name: str):
        uid = name.removesuffix(".png")
        path = Path(config.images_dir) / f"{uid}.png"
        if not UID.match(uid) or not path.is_file():
            raise Refused(404, "no such image")
        return FileResponse(path, media_type="image/png")

    @app.get("/admin/stats")
    def stats(request: Request):
        check_admin(request)
        return {"judgments": count_judgments(engine), "mode": config.mode}

    @app.get("/admin/export")
    def export_zip(request: Request):
        import shutil

        from pickalign.eval.arena.export import export

        check_admin(request)
        # Built in a temporary folder that goes once the zip is sent (or the export fails):
        # an export holds every image, and admins export again and again.
        folder = Path(tempfile.mkdtemp(prefix="arena-export-"))
        try:
            export(
                engine,
                config.images_dir,
                folder / "export",
                config.validation_fraction,
                config.test_fraction,
            )
            archive = shutil.make_archive(str(folder / "arena_export"), "zip", folder / "export")
        except FileNotFoundError as missing:  # an image of a judgment gone from the folder
            shutil.rmtree(folder, ignore_errors=True)
            raise Refused(409, str(missing)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return FileResponse(
            archive,
            filename="arena_export.zip",
            media_type="application/zip",
            background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
        )

    return BodyLimit(app, config.max_body_bytes)
