"""The service's ASGI middlewares, outermost first: `BodyTimeout`, `SecurityHeaders`, then the access gate
(`cbmir.service.access.GateMiddleware`) and `UploadLimits`.

All are plain ASGI: they look at the request's scope and at the response's start message (and may answer in
the app's place), and never re-stream a body. (Starlette's `BaseHTTPMiddleware` re-streams every response
body through a memory pipe per middleware; once, under load, a page behind three of them stopped half-sent:
"Too little data for declared Content-Length".)

`BodyTimeout`: a request body that stops arriving is answered 408 instead of holding its connection (and the
request) until the client gives up: each part of the body must come within the timeout of the one before.
It wraps `receive`: when a part of the body is late, it sends the 408 answer itself and tells the app that
the client went away (an ``http.disconnect``), so the app stops reading; whatever the app then tries to send
is dropped. Once the body is complete, `receive` is passed through untouched (the app may wait on it for a
disconnect for as long as it likes).
"""

from __future__ import annotations

import asyncio
import json

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbmir.service.errors import error_response


class BodyTimeout:
    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = started = answered = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def timed_receive() -> Message:
            nonlocal complete, answered
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                if not started:
                    await self._answer_408(send)
                    answered = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, guarded_send)

    async def _answer_408(self, send: Send) -> None:
        body = json.dumps({"error": f"the request body stopped arriving: nothing for {self.seconds:g} s"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 408, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds `headers` to every answer that does not set them itself."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]):
        self.app, self.headers = app, headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UploadLimits:
    """A request with a body (POST, PUT, PATCH) must say how long it is, and be at most `max_bytes`; it is
    refused (411, 413) before any of its body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = Headers(scope=scope).get("content-length")
            if length is None:
                await error_response(411, "the request must give its Content-Length")(scope, receive, send)
                return
            if not length.isdigit() or int(length) > self.max_bytes:
                message = f"the request body ({length} bytes) is above the limit of {self.max_bytes:,} bytes"
                await error_response(413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)
