"""Refuses request bodies over a size limit with 413 before they are read into memory."""

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.api.errors import problem

MAX_BODY_BYTES = 1024 * 1024


class BodySizeLimit:
    """ASGI middleware: a declared or streamed body over `max_bytes` gets 413 problem+json."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"the request body is larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await problem(413, detail)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            # A body without Content-Length (chunked) is counted as it streams in; the route's
            # exception handling turns this into the same 413 problem answer.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=detail)
            return message

        await self.app(scope, limited_receive, send)
