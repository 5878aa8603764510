"""A local OpenAI-compatible chat server for tests: nothing reaches the network.

    with FakeOpenAI() as server:                       # or the `fake_openai` fixture (import it in the test module)
        server.script(Error(429, retry_after="0.1"), Reply("a cat"))
        settings = LLMSettings(base_url=server.url, model="fake-model", ...)
        ...
        server.requests[0].headers["authorization"]   # what the client sent

POST /v1/chat/completions answers with the first scripted behaviour left in the queue, else with
`reply(body)` (default: "reply to: <last user message>"), which may also return a behaviour. Behaviours:
    Reply(text)                       a chat completion whose message content is `text`
    Error(status, message, retry_after)   an OpenAI-style error body, with a Retry-After header when given
    Hang(seconds)                     no answer for `seconds` (longer than the client's timeout), then a late reply
    Raw(body, status)                 `body` as it is (not JSON, or JSON that is no completion)
    Slow(seconds, then)               `then` (a behaviour) after `seconds`
Every request is recorded (method, path, lower-cased headers, JSON body, time), and the most requests in flight at
once is kept (`max_in_flight`).
"""
import dataclasses
import http.server
import json
import threading
import time
from typing import Callable

import pytest

from tests.helpers import free_port

MODEL_PATH = "/v1/chat/completions"


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str


@dataclasses.dataclass(frozen=True)
class Error:
    status: int
    message: str = "fake server error"
    retry_after: str | None = None


@dataclasses.dataclass(frozen=True)
class Hang:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Raw:
    body: str
    status: int = 200


@dataclasses.dataclass(frozen=True)
class Slow:
    seconds: float
    then: object


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as the server saw it."""
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict | None  # None when the body was not JSON
    at: float  # time.monotonic()

    @property
    def user_message(self) -> str:
        """The content of the request's last user message ("" when there is none)."""
        users = [m for m in (self.body or {}).get("messages", []) if m.get("role") == "user"]
        return users[-1]["content"] if users else ""


def echo(body: dict) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return f"reply to: {users[-1]['content'] if users else ''}"


def completion(text: str, model: str, number: int) -> dict:
    """The JSON of a chat completion, as openai's client parses it."""
    return {"id": f"chatcmpl-fake-{number}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": max(1, len(text.split())),
                      "total_tokens": 1 + max(1, len(text.split()))}}


class FakeOpenAI:
    """The server: start()/stop() or a context manager; `url` is the base URL to give the client (…/v1)."""

    def __init__(self, reply: Callable[[dict], object] = echo):
        self.reply = reply
        self.requests: list[Received] = []
        self.max_in_flight = 0
        self._queue: list[object] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        self.port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours) -> None:
        """Queues behaviours for the next requests, in order (after any still queued)."""
        with self._lock:
            self._queue.extend(behaviours)

    def start(self) -> "FakeOpenAI":
        self.port = free_port()
        self._stopping.clear()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving (hanging answers give up at once); a client then gets connection errors."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving ------------------------------------------------------------------------------------------------
    def _next(self, body: dict) -> object:
        with self._lock:
            if self._queue:
                return self._queue.pop(0)
        return self.reply(body)

    def _record(self, handler, body) -> int:
        with self._lock:
            self.requests.append(Received(handler.command, handler.path, {k.lower(): v for k, v in
                                                                          handler.headers.items()}, body,
                                          time.monotonic()))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return len(self.requests)

    def _answer(self, handler, behaviour, body: dict, number: int) -> None:
        if isinstance(behaviour, str):
            behaviour = Reply(behaviour)
        if isinstance(behaviour, Slow):
            self._stopping.wait(behaviour.seconds)
            return self._answer(handler, behaviour.then, body, number)
        if isinstance(behaviour, Hang):
            self._stopping.wait(behaviour.seconds)
            behaviour = Reply("late reply")
        if isinstance(behaviour, Reply):
            return send(handler, 200, json.dumps(completion(behaviour.text, body.get("model", ""), number)))
        if isinstance(behaviour, Error):
            error = {"error": {"message": behaviour.message, "type": "fake_error", "param": None,
                               "code": str(behaviour.status)}}
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
            return send(handler, behaviour.status, json.dumps(error), headers)
        if isinstance(behaviour, Raw):
            return send(handler, behaviour.status, behaviour.body)
        raise TypeError(f"not a fake server behaviour: {behaviour!r}")

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                number = server._record(self, body)
                try:
                    if self.path != MODEL_PATH or not isinstance(body, dict):
                        send(self, 404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                    else:
                        server._answer(self, server._next(body), body, number)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def log_message(self, *args):  # quiet
                pass

        return Handler


def send(handler, status: int, text: str, headers: dict | None = None) -> None:
    data = text.encode("utf-8")
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
        pass


@pytest.fixture
def fake_openai():
    """A started FakeOpenAI (echo replies), stopped after the test."""
    with FakeOpenAI() as server:
        yield server
