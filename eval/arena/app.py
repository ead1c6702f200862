"""The arena's web app (FastAPI): pages, the judging API, images by uid, and the admin routes.

Raters: ``GET /`` gives a rater id (a signed cookie) and a CSRF token bound to it; every POST
carries the token in ``X-CSRF-Token``. ``POST /api/pair`` gives a pair to judge (generate mode:
for the rater's prompt), ``POST /api/judge`` records a decision (idempotent by the judgment uid the
page makes) and, in generate mode, answers with the pair that follows: the rejected image
replaced by a new one, both after a tie. ``GET /images/<uid>.png`` serves stored images only.
Admin: ``GET /admin/stats`` and ``GET /admin/export`` (a zip of the export) with ``Authorization:
Bearer <token>``.

Refusals, each with a one-line reason: 403 (no session, missing or forged CSRF token, no or a
wrong admin token), 413 (a body over ``max_body_bytes``), 422 (a bad field: an over-long prompt,
an unknown image, a choice other than left/right/tie, images of another prompt), 429 (over
``judgments_per_minute``), 404 (anything else, image names that are not uids included).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from pickalign.eval.arena.config import ArenaConfig
from pickalign.eval.arena.store import (
    CHOICES,
    ImageRow,
    count_judgments,
    open_engine,
    record_judgment,
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
    left: str
    right: str
    choice: str
    latency_ms: float = Field(ge=0, le=86_400_000)


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

    def check(self, rater: str) -> None:
        now = time.monotonic()
        with self.lock:
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
    from pickalign.eval.arena.pairs import EvalPairs, Painter

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
        if not rater or not hmac.compare_digest(sign("rater:" + rater), signature):
            raise Refused(403, "no rater session: load the arena page first")
        return rater

    def check_csrf(request: Request, rater: str) -> None:
        token = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sign("csrf:" + rater), token):
            raise Refused(403, "missing or invalid CSRF token: reload the page")

    def check_admin(request: Request) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given, admin_token):
            raise Refused(403, "admin routes need Authorization: Bearer <admin token>")

    def image_url(uid: str) -> dict:
        return {"uid": uid, "url": f"/images/{uid}.png"}

    def pair_answer(prompt: str, left: str, right: str) -> dict:
        return {"prompt": prompt, "left": image_url(left), "right": image_url(right)}

    @app.exception_handler(Refused)
    async def refused(_request, error: Refused):
        return JSONResponse({"error": error.reason}, status_code=error.status)

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
            "rater", f"{rater}.{sign('rater:' + rater)}", httponly=True, samesite="strict",
            max_age=365 * 86400,
        )  # fmt: skip
        return response

    @app.post("/api/pair")
    def new_pair(request: Request, body: PairRequest):
        rater = rater_of(request)
        check_csrf(request, rater)
        limits.check(rater)
        if config.mode == "compare":
            return pair_answer(*source.pair())
        prompt = " ".join((body.prompt or "").split())
        if not prompt:
            raise Refused(422, "write a prompt first")
        if len(prompt) > config.max_prompt_chars:
            raise Refused(422, f"prompt over {config.max_prompt_chars} characters")
        return pair_answer(prompt, source.draw(prompt), source.draw(prompt))

    @app.post("/api/judge")
    def judge(request: Request, body: JudgeRequest):
        rater = rater_of(request)
        check_csrf(request, rater)
        limits.check(rater)
        if body.choice not in CHOICES:
            raise Refused(422, f"choice must be one of {', '.join(CHOICES)}")
        if body.left == body.right or not (UID.match(body.left) and UID.match(body.right)):
            raise Refused(422, "left and right must be two different image uids")
        with Session(engine) as session:
            shown = [session.get(ImageRow, uid) for uid in (body.left, body.right)]
        if None in shown:
            raise Refused(422, "unknown image uid")
        if shown[0].prompt != shown[1].prompt:
            raise Refused(422, "the two images answer different prompts")
        decided = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        created, judgment_id = record_judgment(
            engine,
            uid=body.uid.replace("-", ""),
            rater=rater,
            mode=config.mode,
            prompt=shown[0].prompt,
            left_uid=body.left,
            right_uid=body.right,
            choice=body.choice,
            shown_at=decided - datetime.timedelta(milliseconds=body.latency_ms),
            decided_at=decided,
            latency_ms=body.latency_ms,
        )
        answer = {"id": judgment_id, "duplicate": not created}
        answer["count"] = count_judgments(engine, rater)
        if config.mode == "generate":  # a retried request's answer carries a next pair too
            prompt = shown[0].prompt
            left = body.left if body.choice == "left" else source.draw(prompt)
            right = body.right if body.choice == "right" else source.draw(prompt)
            answer["next"] = pair_answer(prompt, left, right)
        return answer

    @app.get("/images/{name}")
    def image(name: str):
        uid = name.removesuffix(".png")
        path = Path(config.images_dir) / f"{uid}.png"
        if not UID.match(uid) or not path.is_file():
            return Response("no such image", status_code=404, media_type="text/plain")
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
                engine, config.images_dir, folder / "export", config.validation_fraction,
                config.test_fraction,
            )  # fmt: skip
            archive = shutil.make_archive(str(folder / "arena_export"), "zip", folder / "export")
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
