"""`sparc-engine serve`: one pipeline behind a local HTTP endpoint (the [serve] extra: FastAPI + uvicorn).

    POST /v1/sparc              image (multipart upload, or JSON with base64) + question -> run --json's object
    POST /v1/chat/completions   OpenAI-compatible: one user message with an image_url data: URL and text
    GET  /health, /v1/models

The pipeline is opened once, before the socket opens. Runtimes are not thread-safe, so one worker thread
runs the requests one at a time from a bounded queue; a full queue answers 503 with Retry-After. A
request whose client went away is dropped from the queue (or its result discarded), so it never holds
up the others. Every refusal is a one-line message in OpenAI's error shape: 400 for bad input (and for
a query the runtime refuses), 401 for a missing or wrong bearer token, 413 over a limit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import io
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import UserError
from engine.imaging import ImageTooLargeError, decode_image
from engine.pipeline import Pipeline, open_pipeline
from engine.spec import load_spec

API_KEY_ENV = "SPARC_ENGINE_API_KEY"


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and how many may wait; the defaults are the CLI flags'."""

    max_body_bytes: int  # a request body, base64 included
    max_image_pixels: int  # width x height, checked from the image header before anything is decoded
    max_question_chars: int
    queue_size: int  # requests waiting for the pipeline; one more is running


class HTTPError(Exception):
    """A refusal: its status, a one-line message and any headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kinds = {401: "authentication_error", 500: "server_error", 503: "server_busy"}
    kind = kinds.get(status, "invalid_request_error")
    # OpenAI's error shape (its clients raise with the message); whitespace folded: always one line
    body = {"error": {"message": " ".join(message.split()), "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class Worker:
    """One thread that runs submitted calls one at a time, fed by a bounded queue."""

    def __init__(self, queue_size: int) -> None:
        self.jobs: queue.Queue[tuple[concurrent.futures.Future, Callable[[], Any]]] = queue.Queue(queue_size)
        self.served = 0  # calls run (their clients may have left meanwhile)
        self.abandoned = 0  # calls skipped: their clients left while they waited
        self.thread = threading.Thread(target=self._loop, name="sparc-pipeline", daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.jobs.put_nowait((future, call))
        except queue.Full:
            raise HTTPError(
                503, f"busy: {self.jobs.maxsize} requests are waiting", {"Retry-After": "1"}
            ) from None
        return future

    def _loop(self) -> None:
        while True:
            future, call = self.jobs.get()
            if not future.set_running_or_notify_cancel():  # its client went away while it waited
                self.abandoned += 1
                continue
            try:
                future.set_result(call())
            except Exception as error:  # handed to the request; the worker goes on with the next one
                future.set_exception(error)
            self.served += 1


class BodyLimit:
    """ASGI middleware: reads the whole body, refusing (413) one over `max_bytes` before the app sees
    it, declared or streamed; then replays it to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # after the body: the client's disconnect, when it comes
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over {self.max_bytes:,} bytes (--max-body-bytes)"
        await _error_response(413, message)(scope, receive, send)


class SparcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str  # base64 of an image file (a data: URL is accepted too)
    question: str


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    # sampling fields (temperature, max_tokens, ...) are accepted and ignored: the spec decides them
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


def _problems(errors: Sequence[Any]) -> str:
    """Pydantic's (or FastAPI's) validation errors on one line, each with its location."""
    return "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or 'body'}: {problem['msg']}" for problem in errors
    )


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        if any(problem["type"] == "json_invalid" for problem in error.errors()):
            raise HTTPError(400, "the body is not valid JSON") from None
        raise HTTPError(400, _problems(error.errors())) from None


def _base64_image(text: str) -> bytes:
    """An image file from base64, or from a data: URL (data:image/png;base64,....)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise HTTPError(400, "the image data: URL must be base64 (data:image/...;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "the image is not valid base64") from None


def _chat_input(request: ChatRequest) -> tuple[bytes, str]:
    """The image and question of the last user message."""
    if request.stream:
        raise HTTPError(400, "stream: true is not supported; ask without streaming")
    users = [message for message in request.messages if message.role == "user"]
    if not users:
        raise HTTPError(400, "messages: no user message")
    content = users[-1].content
    parts = content if isinstance(content, list) else [ContentPart(type="text", text=content or "")]
    urls = [part.image_url.url for part in parts if part.type == "image_url" and part.image_url]
    question = "\n".join(part.text for part in parts if part.type == "text" and part.text).strip()
    if len(urls) != 1:
        raise HTTPError(400, f"the user message needs exactly one image_url part (got {len(urls)})")
    if not urls[0].startswith("data:"):
        raise HTTPError(400, "image_url must be a data: URL (the server fetches nothing)")
    if not question:
        raise HTTPError(400, "the user message needs a text part: the question")
    return _base64_image(urls[0]), question


def build_app(pipeline: Pipeline, model: str, limits: Limits, api_key: str | None) -> ASGIApp:
    """The HTTP app over one opened pipeline; `model` is the name /v1/models reports."""
    app = FastAPI(title="sparc-engine", docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(limits.queue_size)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPError(
                401, "a valid API key is needed: Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
            )

    def answer(data: bytes, question: str, viz: bool) -> dict:
        """Runs on the worker thread: decode, run, and draw if asked."""
        image = decode_image(data, "image", max_pixels=limits.max_image_pixels)
        result = pipeline.run(image, question)
        record = result.to_dict()
        if viz:
            from engine.viz import draw_regions

            png = io.BytesIO()
            draw_regions(image, [(r.box, r.score) for r in result.regions]).save(png, format="PNG")
            record["viz_png"] = base64.b64encode(png.getvalue()).decode("ascii")
        return record

    async def run(request: Request, data: bytes, question: str, viz: bool = False) -> dict:
        if len(question) > limits.max_question_chars:
            raise HTTPError(
                413,
                f"the question is {len(question):,} characters; the limit is {limits.max_question_chars:,}",
            )
        waiting = asyncio.wrap_future(worker.submit(lambda: answer(data, question, viz)))
        # the body is read: the next message is the client's disconnect, if it comes first
        disconnect = asyncio.ensure_future(request.receive())
        await asyncio.wait({waiting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()  # a waiting call is skipped; a running one finishes unread
            raise HTTPError(499, "the client disconnected")
        disconnect.cancel()
        try:
            return waiting.result()
        except ImageTooLargeError as error:
            raise HTTPError(413, f"{error} (--max-image-pixels)") from None
        except UserError as error:  # a bad image, or a query the runtime refuses
            raise HTTPError(400, str(error)) from None

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError) -> JSONResponse:
        return _error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(400, _problems(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail), error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, for uvicorn to log its traceback; the server goes on
        return _error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = worker.thread.is_alive()
        body = {
            "status": "ok" if alive else "worker stopped",
            "model": model,
            "model_loaded": True,
            "queue_depth": worker.jobs.qsize(),
            "queue_size": limits.queue_size,
            "served": worker.served,
            "abandoned": worker.abandoned,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "sparc-engine"}],
        }

    @app.post("/v1/sparc", dependencies=[Depends(authorized)])
    async def sparc(request: Request, viz: bool = False) -> dict:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            # the body limit already holds; the question's own limit answers 413 below
            async with request.form(max_files=1, max_fields=2, max_part_size=limits.max_body_bytes) as form:
                upload, question = form.get("image"), form.get("question")
                if not isinstance(upload, UploadFile) or not isinstance(question, str):
                    raise HTTPError(400, "multipart needs an 'image' file and a 'question' field")
                data = await upload.read()
            return await run(request, data, question, viz)
        if content_type.startswith("application/json"):
            body = _parse(SparcRequest, await request.body())
            return await run(request, _base64_image(body.image), body.question, viz)
        raise HTTPError(400, "send multipart/form-data (image, question) or application/json")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(request: Request) -> dict:
        data, question = _chat_input(_parse(ChatRequest, await request.body()))
        record = await run(request, data, question)
        stages = record["stages"]
        # the tokens run through the model; KV reused from the prefix cache or forked is not counted
        prompt = sum(stage["prompt_tokens"] for stage in stages)
        completion = sum(stage["generated_tokens"] for stage in stages)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": record["answer"]},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "sparc": record,
        }

    return BodyLimit(app, limits.max_body_bytes)


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    spec = load_spec(args.spec, args.overrides)
    limits = Limits(args.max_body_bytes, args.max_image_pixels, args.max_question_chars, args.queue_size)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    model = spec.name or args.spec.stem
    app = build_app(open_pipeline(spec), model, limits, api_key)  # a bad bundle fails before the socket opens
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without an API key (--api-key or {API_KEY_ENV})",
            file=sys.stderr,
        )
    print(f"serving {model} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
