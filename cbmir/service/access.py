"""Who may call which route, checked before a request's body is read, and the audit record of every /v1
request, written before its answer is sent.

The caller is found from the headers alone: the server's own token (`--token-file`, `CBMIR_TOKEN`) is an
admin; any other bearer token is looked up among the index's users. A server with neither a token nor
users is open, to this machine only (`ServiceSettings.check_binding`), and its callers are "anonymous"
admins. `ROUTE_ROLES` is the one table of the role each /v1 route needs; a route missing from it is refused
to everyone. A client that keeps sending wrong tokens is answered 429 for a while, before any token is
checked (each check costs scrypt's tens of milliseconds).

Every /v1 request that gets past the rate limit is audited, refused ones too. The record is written after
the route has run and before its answer leaves: when it cannot be written, the answer is a 503 instead, so
nothing is returned unaudited. A change (an added or removed image, a new code) is already committed by
then; its 503 says so, and the server log names the change.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbmir.access import AuditTrail, AuditWriteError, Event, Role, User, UserDirectory
from cbmir.service.errors import error_response
from cbmir.service.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVER_TOKEN_USER = User("server-token", Role.admin)
ANONYMOUS = User("anonymous", Role.admin)
TRACKED_CLIENTS = 10_000

# The role each /v1 route needs ("METHOD path template"); a test keeps it complete against the OpenAPI schema.
ROUTE_ROLES: dict[str, Role] = {
    "GET /v1/me": Role.reader,
    "POST /v1/search": Role.reader,
    "POST /v1/search/pacs": Role.reader,
    "GET /v1/images/{image_id}/similar": Role.reader,
    "GET /v1/images/{image_id}/explain": Role.reader,
    "POST /v1/explain": Role.reader,
    "GET /v1/images/{image_id}": Role.reader,
    "GET /v1/images/{image_id}/thumbnail": Role.reader,
    "GET /v1/images/{image_id}/original": Role.reader,
    "GET /v1/codes": Role.reader,
    "GET /v1/stats": Role.reader,
    "POST /v1/annotate": Role.annotator,
    "GET /v1/annotations": Role.annotator,
    "PUT /v1/images/{image_id}/code": Role.annotator,
    "POST /v1/images": Role.admin,
    "DELETE /v1/images/{image_id}": Role.admin,
}
# The routes that change the index (the others only read it).
CHANGING_ROUTES = frozenset(
    {"POST /v1/annotate", "PUT /v1/images/{image_id}/code", "POST /v1/images", "DELETE /v1/images/{image_id}"}
)


@dataclass
class AuditNote:
    """What a route tells the audit record about its request: the images it returned or changed, the
    number of results, and details worth keeping (filters, codes)."""

    images: list[int] = field(default_factory=list)
    count: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def saw(self, ids: list[int], *, results: bool = False, **detail: Any) -> None:
        """Note images returned or changed (`results`: they are the request's results, and are counted)."""
        self.images.extend(int(i) for i in ids)
        if results:
            self.count = (self.count or 0) + len(ids)
        self.detail.update({key: value for key, value in detail.items() if value is not None})


def audit_note(request: Request) -> AuditNote:
    """The request's `AuditNote` (made by the gate for every /v1 request)."""
    note = getattr(request.state, "audit", None)
    if note is None:
        note = request.state.audit = AuditNote()
    return note


class FailedLogins:
    """Wrong tokens per client address in a sliding window; a client with `limit` of them within
    `window` seconds is refused until the oldest leaves the window. Used from the event loop only."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        return failures[0] + self.window - now if len(failures) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(time.monotonic())
        self._failures.move_to_end(client)
        if len(self._failures) > TRACKED_CLIENTS:
            self._failures.popitem(last=False)


class Gate:
    """Authorises and audits every /v1 request (see the module's docstring); `GateMiddleware` puts it before
    the routes."""

    def __init__(self, routes: list[APIRoute], settings: ServiceSettings, users: UserDirectory, trail: AuditTrail):
        self.routes, self.settings, self.users, self.trail = routes, settings, users, trail
        self.failed_logins = FailedLogins(settings.failed_logins_per_minute)

    def auth_required(self) -> bool:
        return self.settings.token is not None or self.users.has_users()

    def caller(self, authorization: str) -> User | None:
        """The user a request's Authorization header names, or None. Blocking (scrypt, the store)."""
        if not self.auth_required():
            return ANONYMOUS
        scheme, _, given = authorization.partition(" ")
        token = given.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if self.settings.token is not None and secrets.compare_digest(token.encode(), self.settings.token.encode()):
            return SERVER_TOKEN_USER
        return self.users.authenticate(token)

    def route(self, request: Request) -> str | None:
        """The "METHOD template" of the route that will answer, None when none will (a 404 or 405)."""
        for route in self.routes:
            if route.matches(request.scope)[0] == Match.FULL:
                return f"{request.method} {route.path}"
        return None

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an HTTP request through `app`, the /v1 ones once authorised and with their audit record."""
        if not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            await app(scope, receive, send)  # not the API; or a CORS preflight, which carries no credentials
            return
        request = Request(scope)
        client = request.client.host if request.client else "-"
        wait = self.failed_logins.wait(client)
        if wait > 0:
            message = f"too many wrong tokens from {client}: try again in {wait:.0f} s"
            await error_response(429, message, {"Retry-After": str(int(wait) + 1)})(scope, receive, send)
            return
        route = self.route(request)
        named = route or f"{request.method} {request.url.path}"
        event = Event(user="-", role="-", route=named, client=client, status=0)
        user = await run_in_threadpool(self.caller, request.headers.get("authorization", ""))
        refusal = None
        if user is None:
            self.failed_logins.failed(client)
            refusal = error_response(
                401, "a valid token is needed: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        else:
            event = Event(user=user.name, role=user.role.value, route=event.route, client=client, status=0)
            needed = ROUTE_ROLES.get(route) if route else None
            if route is not None and (needed is None or not user.role.allows(needed)):
                role = needed.value if needed else "an undeclared"
                refusal = error_response(403, f"{route} needs the {role} role; {user.name} is {user.role.value}")
        if refusal is not None:
            answer = await self._audited(event, refusal.status_code, AuditNote())
            await (answer or refusal)(scope, receive, send)
            return
        request.state.user = user
        note = audit_note(request)
        started = replaced = False

        async def audited_send(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                replacement = await self._audited(event, message["status"], note)
                if replacement is not None:
                    replaced = True
                    await replacement(scope, receive, send)
            if not replaced:
                await send(message)

        try:
            await app(scope, receive, audited_send)
        except BaseException:
            if not started:
                await self._audited(event, 500, note)
            raise

    async def _audited(self, event: Event, status: int, note: AuditNote) -> Response | None:
        """Writes the audit record of an answer with `status`; None once written, else the 503 to answer instead."""
        done = Event(
            user=event.user,
            role=event.role,
            route=event.route,
            client=event.client,
            status=status,
            images=note.images,
            count=note.count,
            detail=note.detail,
        )
        try:
            await run_in_threadpool(self.trail.append, done)
        except AuditWriteError as error:
            changed = event.route in CHANGING_ROUTES and status < 400
            change = f" after {done.route} by {done.user} changed images {done.images}" if changed else ""
            log.error("%s%s", error, change)
            message = "the audit trail cannot be written, so nothing is answered"
            if changed:
                message += "; the change itself was made"
            return error_response(503, f"{message} (the server log has the details)")
        return None


class GateMiddleware:
    """`Gate` as the app's ASGI middleware (the gate itself lives on as `app.state.gate`, for the routes)."""

    def __init__(self, app: ASGIApp, gate: Gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.gate.serve(self.app, scope, receive, send)
