"""A small OpenAI-compatible chat server for one local model.

    reflectevo serve builtin:tiny --port 8000
    # then, in another process or on another machine:
    reflect.judge: {kind: openai, url: "http://127.0.0.1:8000/v1", model: builtin:tiny}

``GET /v1/models`` lists the one model; ``POST /v1/chat/completions`` answers with the package's
generation engine, one request at a time (one model, one lock). It understands ``model``,
``messages``, ``temperature`` (0 = greedy; 1 when absent, as OpenAI), ``top_p``, ``max_tokens``
(or ``max_completion_tokens``), ``n`` (1 only), ``stop`` and ``seed``; other fields are ignored.
Whatever ``model`` a request names, the loaded model answers, and the reply says which.

There is no authentication: it listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reflectevo.config import GenerationParams, ModelParams
from reflectevo.errors import ServeError, SettingsError
from reflectevo.generation.engines import make_engine
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.models.loading import load_model

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = GenerationParams().max_new_tokens  # when a request gives no max_tokens
MAX_BODY_BYTES = 16 * 2**20
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---- reading a request ---------------------------------------------------------------------------
def parse_completion_request(body: Any) -> tuple[list[dict[str, Any]], GenerationSettings]:
    """The chat messages and sampling settings of a ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    if body.get("stream"):
        raise RequestError("streaming is not supported; send stream: false")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise RequestError(f"n must be 1 (this server returns one choice per request), got {n}")
    max_tokens = _number(body, "max_tokens", int, None)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", int, DEFAULT_MAX_TOKENS)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is None:
        stop = []
    elif not (isinstance(stop, list) and all(isinstance(text, str) for text in stop)):
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")
    try:
        settings = GenerationSettings(
            n=1,
            temperature=_number(body, "temperature", float, 1.0),
            top_p=_number(body, "top_p", float, 1.0),
            max_new_tokens=max_tokens,
            stop=tuple(stop),
            seed=_number(body, "seed", int, 0),
        )
    except SettingsError as exc:
        raise RequestError(str(exc)) from None
    return _messages(body.get("messages")), settings


def _number(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # JSON true/false are Python ints; 2.0 is a fine integer, 2.5 is not; Python's json reads NaN and Infinity
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (kind is int and value != int(value))
    ):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # the newer form: a list of typed parts; only text parts make sense here
            if not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content
            ):
                raise RequestError(f"messages[{i}].content: only text parts are supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        parsed.append({"role": message["role"], "content": content})
    return parsed


# ---- the server ----------------------------------------------------------------------------------
class ChatServer(ThreadingHTTPServer):
    """Binds at construction; answers once :meth:`attach` gave it an engine."""

    daemon_threads = True  # a hung client never keeps the process alive

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, ChatHandler)
        self.engine: Any = None
        self.model_id = ""
        self.completions = 0  # answered chat completions, for tests and logs
        self.generate_lock = threading.Lock()  # one model: one generation at a time
        self.started = int(time.time())

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", ""):  # listening everywhere: name this machine, not the wildcard
            host = socket.gethostname()
        return f"http://{host}:{port}/v1"

    def attach(self, engine: Any, model_id: str) -> None:
        self.engine, self.model_id = engine, model_id

    def complete(self, messages: list[dict[str, Any]], settings: GenerationSettings) -> dict[str, Any]:
        """One chat completion, in the OpenAI response shape."""
        if self.engine is None:
            raise RequestError("the model is still loading; retry in a moment", status=503)
        with self.generate_lock:
            try:
                self.engine.render(messages)
            except Exception as exc:  # the chat template's own check, e.g. roles it does not allow
                raise RequestError(f"the model's chat template rejects these messages: {exc}") from exc
            [output] = self.engine.generate([GenerationRequest("completion", messages)], settings, stage="serve")
            self.completions += 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": output.text},
                    "finish_reason": "length" if output.finish_reason == "length" else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.new_tokens,
                "total_tokens": output.prompt_tokens + output.new_tokens,
            },
        }


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "reflectevo-serve"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self._path() != "/v1/models":
            return self._not_found()
        model = {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.started,
            "owned_by": "reflectevo",
        }
        self._send(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        if self._path() != "/v1/chat/completions":
            return self._not_found()
        try:
            messages, settings = parse_completion_request(self._read_json())
            reply = self.server.complete(messages, settings)
        except RequestError as exc:
            self._error(exc.status, str(exc), "invalid_request_error")
        except Exception as exc:
            log.exception("chat completion failed")
            self._error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        else:
            self._send(200, reply)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # what http.server refuses itself (an unknown method, a garbled request line) also answers in JSON
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0], "invalid_request_error")

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("the Content-Length header is not a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413)
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None

    def _not_found(self) -> None:
        self._error(
            404,
            f"no such endpoint: {self.command} {self.path}; this server has GET /v1/models and "
            "POST /v1/chat/completions",
            "invalid_request_error",
        )

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _listen(host: str, port: int) -> ChatServer:
    try:
        return ChatServer((host, port))
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another --port or --host, or stop what holds it"
        ) from None


def _engine(loaded_model: Any) -> Any:

    # auto: Unsloth's inference path for a model loaded through Unsloth, else plain transformers
    return make_engine(GenerationParams(engine="auto", batch_size=1), loaded_model, progress=False)


def make_server(loaded_model: Any, host: str = "127.0.0.1", port: int = 0, model_id: str | None = None) -> ChatServer:
    """A bound server for ``loaded_model`` (a :class:`~reflectevo.models.LoadedModel`); run
    ``serve_forever()`` in a thread. ``port=0`` picks a free port: see ``server.server_address``."""
    server = _listen(host, port)
    server.attach(_engine(loaded_model), model_id or loaded_model.name)
    return server


def serve(model_params: ModelParams, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the model, print the base URL, and answer until interrupted (Ctrl-C)."""

    with _listen(host, port) as server:  # bind first: a taken port fails before a long model load
        loaded = load_model(model_params)
        server.attach(_engine(loaded), model_params.name)
        print(f"serving {model_params.name} on {server.base_url} (Ctrl-C stops)", flush=True)
        print(
            f"judge params: reflect.judge: {{kind: openai, url: {server.base_url!r}, model: {model_params.name!r}}}",
            flush=True,
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(
                "warning: this server has no authentication; anyone who can reach the port can use the model",
                flush=True,
            )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
