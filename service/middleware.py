"""ASGI middleware of the tipsen service: the public API documents, one JSON error shape, and a guard in front of
BentoML's app.

Order, outermost first: PublicDocument -> ErrorShape -> Guard -> BentoML's app. The guard checks, in this order: the Host header
(DNS rebinding), private routes, bearer auth, the client's share of requests, the content type (JSON only: a web
page cannot post JSON to another origin without asking), and the body (its size, its deadline and its rate). Only a
request read whole counts against `service.max_concurrency`, so slow senders hold no slot. Errors are JSON
`{"error": "<one line naming the field>", "detail": "..."}`. The API key is read once from the environment,
compared in constant time and never logged.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import secrets
from collections import Counter

from tipsen.config import API_KEY_ENV
from tipsen.errors import describe
from tipsen.server import BIND_HOST_ENV

INTERNAL_HEADER = "x-tipsen-internal"
INTERNAL_TOKEN = secrets.token_urlsafe(32)  # per process: lets the service call its own batch API, nobody else
HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
PAGE_PATHS = frozenset({"/", "/favicon.ico"})  # the web page asks for the key itself, so it loads without one
PAGE_PREFIX = "/ui/"
RATE_GRACE_S = 1.0  # the first second of a body is not held to service.min_body_rate
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
PAGE_HEADERS = [  # the page runs its own script and style files only, talks to this service only, is never framed
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
]


def _header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k == name), None)


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


async def send_json_as(send, start: dict, body: dict) -> None:
    """`body` as JSON, with the status and the other headers of the response `start` it replaces."""
    extra = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    await send_json(send, start["status"], body, extra)


async def edit_response(app, scope, receive, send, *, wants, rewrite) -> None:
    """Run `app`; a response whose start message `wants(start)` accepts is held whole and handed to
    `rewrite(send, start, body_bytes)` instead of being sent; any other passes through untouched."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def capture(msg):
        nonlocal start
        if msg["type"] == "http.response.start" and wants(msg):
            start = msg
            return
        if start is None:
            return await send(msg)
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            await rewrite(send, start, b"".join(chunks))

    await app(scope, receive, capture)


def is_internal(scope) -> bool:
    got = _header(scope, INTERNAL_HEADER.encode())
    return got is not None and hmac.compare_digest(got, INTERNAL_TOKEN.encode())


def is_page(path: str) -> bool:
    """The web page and its files: they load without the key (the page asks for it) and carry the CSP."""
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIX)


def host_name(host: bytes) -> str:
    """The name of a Host header: 'example.org:3000' -> 'example.org', '[::1]:3000' -> '::1'."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Hosts:
    """Which Host headers are answered: localhost names, IP literals (a rebinding attack needs a name), the name
    `tipsen serve` bound to, and `service.allowed_hosts` ("name", ".suffix" for it and its subdomains, "*")."""

    def __init__(self, allowed: list[str]):
        bind = os.environ.get(BIND_HOST_ENV, "").strip().lower()
        self.names = {"localhost", *(n.lower().rstrip(".") for n in allowed), *([bind] if bind else [])}
        self.any = "*" in self.names

    def allows(self, name: str) -> bool:
        name = name.rstrip(".")
        if self.any or name in self.names or name.endswith(".localhost"):
            return True
        if any(n.startswith(".") and (name == n[1:] or name.endswith(n)) for n in self.names):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def is_loopback(host: str) -> bool:
    """Whether a client address is this machine's own (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """Host check (400), private routes (404 to outsiders), optional bearer auth (401), per-client and overall
    limits (429), JSON only (415), a body cap (413) and a body deadline (408); security headers on every answer."""

    def __init__(self, app, *, service, private: frozenset[str] = frozenset(), key_env: str = API_KEY_ENV):
        self.app, self.svc, self.private = app, service, private
        self.hosts = Hosts(service.allowed_hosts)
        key = os.environ.get(key_env, "")
        self.expected = key.encode() if key else None
        self.per_client: Counter[str] = Counter()  # requests in flight per client address, bodies still arriving too
        self.in_flight = 0  # requests read whole and not yet answered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if is_internal(scope):  # the service's own call to its batch API: its outer request holds the slots
            return await self.app(scope, receive, send)
        send = self._with_headers(send, page=is_page(path))
        if path in HEALTH_PATHS:  # probes come by pod IP or any name, and are never limited
            return await self.app(scope, receive, send)
        if (refused := self._refusal(scope)) is not None:
            status, message, headers = refused
            return await send_json(send, status, {"error": message}, headers)
        client = (scope.get("client") or ("",))[0]
        cap = self.svc.max_client_requests
        if cap and self.per_client[client] >= cap:
            return await send_json(send, 429, {"error": f"busy: this client already has {cap} requests in flight "
                                                        "(service.max_client_requests); retry in a few seconds"},
                                   [(b"retry-after", b"5")])
        self.per_client[client] += 1
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

    def _refusal(self, scope) -> tuple[int, str, list] | None:
        """Why a request is refused before its body is read: its Host, a private route, or no key."""
        host = _header(scope, b"host")
        if host is not None and not self.hosts.allows(name := host_name(host)):
            return 400, (f"host: {name[:100]!r} is not a name this service answers to; add it to "
                         "service.allowed_hosts (localhost and IP addresses are always answered)"), []
        if scope["path"] in self.private:
            return 404, "Not Found", []
        if self.expected and not is_page(scope["path"]):
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(b" "), self.expected):
                return 401, "authorization: send the header 'Authorization: Bearer <key>' with the service's key", \
                    [(b"www-authenticate", b"Bearer")]
        return None

    async def _admitted(self, scope, receive, send):
        app_receive = receive
        if scope["method"] == "POST":
            ctype = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            unsupported = {"error": f"content-type: {ctype.decode('latin-1')[:80]!r} is not supported; allowed: "
                                    "application/json"}
            if ctype and ctype != b"application/json":  # text/plain: what any web page may post to another site
                return await send_json(send, 415, unsupported)
            body = await self._read(scope, receive, send)
            if body is None:
                return
            if body and not ctype:  # a body without a type is also a page's cross-site post; no body: BentoML's 400
                unsupported["error"] = "content-type: none was sent; allowed: application/json"
                return await send_json(send, 415, unsupported)
            replayed = False

            async def app_receive():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later calls only wait for the disconnect

        if self.in_flight >= self.svc.max_concurrency:
            return await send_json(send, 429, {"error": f"busy: {self.svc.max_concurrency} requests are in flight "
                                                        "(service.max_concurrency); retry in a few seconds"},
                                   [(b"retry-after", b"5")])
        self.in_flight += 1
        try:
            await self.app(scope, app_receive, send)
        finally:
            self.in_flight -= 1

    async def _read(self, scope, receive, send) -> bytes | None:
        """The whole body, or None after answering 413 or 408 (the body is buffered: it is capped and small).

        It must arrive within service.body_timeout_s, and after its first second at service.min_body_rate bytes
        a second on average: a sender that trickles bytes is cut off instead of holding the connection."""
        limit, deadline_s, rate = self.svc.max_body_bytes, self.svc.body_timeout_s, self.svc.min_body_rate
        too_big = {"error": f"body: larger than {limit} bytes (service.max_body_bytes)"}
        close = [(b"connection", b"close")]
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json(send, 413, too_big, close)
            return None
        loop = asyncio.get_running_loop()
        start = loop.time()
        chunks, size, more = [], 0, True
        while more:
            rate_limit = max(RATE_GRACE_S, size / rate) if rate else deadline_s
            wait = min(deadline_s, rate_limit) - (loop.time() - start)
            try:
                if wait <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                slow = (f"body: arriving slower than {rate} bytes a second (service.min_body_rate)"
                        if rate_limit < deadline_s else
                        f"body: not received within {deadline_s:g} s (service.body_timeout_s)")
                await send_json(send, 408, {"error": slow}, close)
                return None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_json(send, 413, too_big, close)
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _with_headers(send, *, page: bool):
        extra = SECURITY_HEADERS + (PAGE_HEADERS if page else [])

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": [*msg.get("headers", []), *(h for h in extra if h[0] not in have)]}
            await send(msg)

        return wrapped


def one_line(detail: list) -> str:
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
        await edit_response(self.app, scope, receive, send, rewrite=self._rewrite,
                            wants=lambda start: 400 <= start["status"] < 500 and start["status"] != 413)

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
            line = one_line(body["detail"])
            body = {"error": line or body.get("error", "invalid request"), "detail": line}
        elif isinstance(body, dict) and "error" not in body and isinstance(body.get("detail"), str):
            body = {"error": body["detail"]}  # Starlette's {"detail": "Not Found"}
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            await send(start)
            await send({"type": "http.response.body", "body": raw})
            return
        await send_json_as(send, start, body)


def public_document(spec: dict, private: frozenset[str]) -> dict:
    """BentoML's OpenAPI 3.0 document as clients may rely on it: without the private routes and the schemas only
    they use, and with pydantic's `anyOf [X, {type: null}]` (OpenAPI 3.1) written as 3.0's `nullable: true`."""
    spec = {**spec, "paths": {p: v for p, v in spec.get("paths", {}).items() if p not in private}}

    def nullable(node):
        if isinstance(node, list):
            return [nullable(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: nullable(v) for k, v in node.items()}
        branches = node.get("anyOf")
        if isinstance(branches, list) and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            node.pop("anyOf")
            if len(rest) == 1 and "$ref" not in rest[0]:
                node.update(rest[0])
            else:  # a $ref takes no siblings in 3.0: wrap it
                node["anyOf" if len(rest) > 1 else "allOf"] = rest
            node["nullable"] = True
        return node

    spec = nullable(spec)
    schemas = spec.get("components", {}).get("schemas", {})
    used: set[str] = set()

    def refs(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in used and name in schemas:
                    used.add(name)
                    refs(schemas[name])
            for value in node.values():
                refs(value)
        elif isinstance(node, list):
            for value in node:
                refs(value)

    refs({k: v for k, v in spec.items() if k != "components"})
    if schemas:
        spec["components"] = {**spec["components"], "schemas": {k: v for k, v in schemas.items() if k in used}}
    return spec


def public_schema(schema: dict, private: frozenset[str]) -> dict:
    """BentoML's /schema.json (what its clients build their methods from) without the private routes."""
    return {**schema, "routes": [r for r in schema.get("routes", []) if r.get("route") not in private],
            "paths": {p: v for p, v in schema.get("paths", {}).items() if p not in private}}


class PublicDocument:
    """Serves GET /docs.json and /schema.json without the private routes (`public_document`, `public_schema`):
    BentoML builds both from every API; clients, and the clients generated from them, see only the public ones.
    The service's own calls to its batch API use the service object, not these documents."""

    EDITS = {"/docs.json": public_document, "/schema.json": public_schema}

    def __init__(self, app, *, private: frozenset[str]):
        self.app, self.private = app, private

    async def __call__(self, scope, receive, send):
        edit = self.EDITS.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "GET" else None
        if edit is None:
            return await self.app(scope, receive, send)

        async def rewrite(send, start, raw):
            await send_json_as(send, start, edit(json.loads(raw), self.private))

        await edit_response(self.app, scope, receive, send, rewrite=rewrite, wants=lambda start: start["status"] == 200)
