"""A request body that stops arriving is answered 408 instead of holding its connection (and the request)
until the client gives up: each part of the body must come within the timeout of the one before.

An ASGI middleware around the whole app. It wraps `receive`: when a part of the body is late, it sends the
408 answer itself and tells the app that the client went away (an ``http.disconnect``), so the app stops
reading; whatever the app then tries to send is dropped. Once the body is complete, `receive` is passed
through untouched (the app may wait on it for a disconnect for as long as it likes).
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
