"""ASGI middleware of the tipsen service: one JSON error shape, private routes, bearer auth, a body-size cap.

Order, outermost first: ErrorShape -> Guard (private routes, auth, content type, body cap) -> BentoML's app.
Errors are JSON `{"error": "<one line naming the field>", "detail": "..."}`. The API key is read once from the
environment, compared in constant time and never logged.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets

from tipsen.errors import describe

INTERNAL_HEADER = "x-tipsen-internal"
INTERNAL_TOKEN = secrets.token_urlsafe(32)  # per process: lets the service call its own batch API, nobody else
HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
PAGE_PATHS = frozenset({"/", "/favicon.ico"})  # the web page asks for the key itself, so it loads without one
PAGE_PREFIX = "/ui/"


def _header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k == name), None)


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def is_internal(scope) -> bool:
    got = _header(scope, INTERNAL_HEADER.encode())
    return got is not None and hmac.compare_digest(got, INTERNAL_TOKEN.encode())


class Guard:
    """Private routes (404 to outsiders), optional bearer auth (401), JSON only (415), a body cap (413)."""

    def __init__(self, app, *, max_body_bytes: int, private: frozenset[str] = frozenset(),
                 key_env: str = "TIPSEN_API_KEY"):
        self.app, self.max_body, self.private = app, max_body_bytes, private
        key = os.environ.get(key_env, "")
        self.expected = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, internal = scope["path"], is_internal(scope)
        if path in self.private and not internal:
            return await send_json(send, 404, {"error": "Not Found"})
        open_path = path in HEALTH_PATHS or path in PAGE_PATHS or path.startswith(PAGE_PREFIX)
        if self.expected and not (internal or open_path):
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(b" "), self.expected):
                return await send_json(send, 401, {"error": "authorization: send the header "
                                                            "'Authorization: Bearer <key>' with the service's key"},
                                       [(b"www-authenticate", b"Bearer")])
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        ctype = (_header(scope, b"content-type") or b"application/json").split(b";")[0].strip().lower()
        if ctype not in (b"application/json", b"text/plain", b""):  # BentoML would try multipart, pickle...
            return await send_json(send, 415, {"error": f"content-type: {ctype.decode('latin-1')!r} is not "
                                                        "supported; allowed: application/json"})
        body = await self._read(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls only wait for the disconnect

        await self.app(scope, replay, send)

    async def _read(self, scope, receive, send) -> bytes | None:
        """The whole body, or None after answering 413 (the body is buffered: it is capped and small)."""
        too_big = {"error": f"body: larger than {self.max_body} bytes (service.max_body_bytes)"}
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await send_json(send, 413, too_big, [(b"connection", b"close")])
            return None
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await send_json(send, 413, too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        return b"".join(chunks)


def _one_line(detail: list) -> str:
    """Pydantic errors as 'field: message (got value)' clauses, formatted as everywhere in tipsen."""
    return "; ".join(describe(err, skip=("body", "query"), show_input=False) if isinstance(err, dict) else str(err)
                     for err in detail)


class ErrorShape:
    """Rewrites every 4xx JSON body into the documented shape, {"error": "<one line>", ...}.

    BentoML documents 400 as {"error": str, "detail": str} but sends `detail` as a list of pydantic errors, and
    wraps other 4xx messages in a list; FastAPI and Starlette answer 404, 405 and 422 as {"detail": ...}. Clients
    then meet four shapes; after this they meet one. The status code is kept.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def capture(msg):
            nonlocal start
            if msg["type"] == "http.response.start" and 400 <= msg["status"] < 500 and msg["status"] != 413:
                start = msg
                return
            if start is None:
                return await send(msg)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                await self._rewrite(send, start, b"".join(chunks))

        await self.app(scope, receive, capture)

    @staticmethod
    async def _rewrite(send, start: dict, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:  # Starlette's plain-text 404 and 405 ("Not Found")
            text = raw.decode("utf-8", "replace").strip().splitlines()
            body = {"error": text[0][:200]} if text else {"error": f"HTTP {start['status']}"}
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
            body = body[0]
        if isinstance(body, dict) and isinstance(body.get("detail"), list):
            line = _one_line(body["detail"])
            body = {"error": line or body.get("error", "invalid request"), "detail": line}
        elif isinstance(body, dict) and "error" not in body and isinstance(body.get("detail"), str):
            body = {"error": body["detail"]}  # Starlette's {"detail": "Not Found"}
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            await send(start)
            await send({"type": "http.response.body", "body": raw})
            return
        extra = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        await send_json(send, start["status"], body, extra)
