"""An OpenAI-compatible chat client for many rows: a resumable reply cache, retries, bounded concurrency.

    settings = LLMSettings.from_config(config.eval.llm, "gpt-4o-mini")
    with Client(settings, "workdir/llm_cache.sqlite") as client:
        texts = client.complete_many([[{"role": "user", "content": "hi"}], ...], desc="rows", validate=one_line)
        client.stats                                   # rows, cached, requested, retried, malformed, failed

The key. It is read from os.environ[settings.api_key_env] when a Client is made and given to openai.OpenAI only:
no message, log line, exception or file (the cache included) holds it, and a server message that echoes it has it
replaced by <key>. Errors of the endpoint are raised `from None`, so no traceback shows openai's own objects.

Requests. A request is a list of chat messages ({"role", "content"}); model, temperature and max_tokens are the
settings'. openai's own retries are off (max_retries=0); ours:
  * 408, 409, 429, 5xx, timeouts, connection errors and a 200 whose body is no chat completion are retried, up to
    settings.max_retries times, after the server's Retry-After (seconds or an HTTP date; or retry-after-ms) when it
    sends one, else backoff_s * 2**k (k = retries so far) with jitter (the second half of it random); never
    longer than max_backoff_s. After the last: LLMError with the number of attempts and the last status.
  * any other status (400, 401, 404, ...) stops at once: LLMError with the status and the server's message.
  * settings.max_requests (0 = no limit) caps the HTTP requests of a Client, retries included; a spent budget is an
    LLMError (what was answered is cached, so a rerun with a larger budget goes on from there).

The cache. Every reply is stored as it arrives, in one SQLite table (key, attempt, request, reply) committed at
once, so a crash or kill loses nothing already answered and a rerun asks only for what is missing. A request's
key is the sha256 of its canonical JSON: {model, messages, temperature, max_tokens}, sorted keys, no spaces. The
raw reply is stored and validated when read, so a changed validator needs no new requests.

Validation. `validate(reply) -> cleaned text | None`; None marks a malformed reply (empty, several lines where one
is asked for, a refusal). It is asked again as a new request: the same request is sent (its content does not
change), but its reply is cached under the key of attempt n, the sha256 of the canonical JSON with "attempt": n
added (attempt 0 has no such field, so its key is the plain request's). A row first reads its cached attempts
0, 1, ... (no request), then sends new attempts, at most `attempts` requests per row and call; a row still without
a valid reply is None (counted as failed), not an exception, and a rerun asks it again under the next numbers.
"""
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from typing import Callable, Mapping, Sequence

import tqdm

from diffchat_jax.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

RETRY_STATUSES = (408, 409, 429)  # and every 5xx
MAX_SERVER_MESSAGE = 300  # characters of a server's error message quoted in ours
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Messages = Sequence[Mapping[str, str]]
Validator = Callable[[str], "str | None"]


class LLMError(UserError):
    """A chat endpoint that gave no usable answer; the message names the endpoint, model and status."""


class _Stopped(Exception):
    """A worker stopped because another row failed (complete_many re-raises that row's error)."""


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    """An endpoint, a model and how to ask it (`eval.llm` in configs/eval.py). The key is not stored here: it is
    read from the environment variable `api_key_env` by api_key()."""
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 60.0  # of one HTTP request
    max_retries: int = 6  # after the first attempt
    backoff_s: float = 1.0  # the first delay (doubled after each retry)
    max_backoff_s: float = 60.0  # the longest delay, Retry-After included
    concurrency: int = 8  # requests in flight at once
    max_requests: int = 0  # HTTP requests a Client may send, retries included (0 = no limit)
    field: str = dataclasses.field(default="llm", compare=False, repr=False)  # the config path errors name

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"config.{self.field}: the model name is empty (an openai:MODEL system names it)")
        checks = {
            "base_url": (isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://")),
                         "must be an http(s) URL such as https://api.openai.com/v1"),
            "api_key_env": (isinstance(self.api_key_env, str) and ENV_NAME.fullmatch(self.api_key_env) is not None,
                            "must name an environment variable (the key itself goes in that variable)"),
            "temperature": (0 <= self.temperature <= 2, "must be in 0 .. 2"),
            "max_tokens": (self.max_tokens >= 1, "must be >= 1"),
            "timeout_s": (self.timeout_s > 0, "must be > 0"),
            "max_retries": (self.max_retries >= 0, "must be >= 0"),
            "backoff_s": (self.backoff_s >= 0, "must be >= 0"),
            "max_backoff_s": (self.max_backoff_s >= self.backoff_s, "must be >= backoff_s"),
            "concurrency": (self.concurrency >= 1, "must be >= 1"),
            "max_requests": (self.max_requests >= 0, "must be >= 0 (0 = no limit)"),
        }
        for name, (ok, what) in checks.items():
            if not ok:
                raise ConfigError(f"config.{self.field}.{name} {what}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, c, model: str, field: str = "eval.llm") -> "LLMSettings":
        """The settings of ConfigDict `c` (the fields above but model; missing ones keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("model", "field")]
        if "base_url" not in c:
            raise ConfigError(f"config.{field}.base_url is missing: the endpoint, e.g. https://api.openai.com/v1")
        return cls(model=model, field=field, **{name: c[name] for name in names if name in c})

    def api_key(self) -> str:
        """The key in os.environ[api_key_env]; ConfigError naming the variable when it is unset or empty."""
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"the environment variable {self.api_key_env} is not set: set {self.api_key_env} to "
                              f"the API key of {self.base_url} (config.{self.field}.api_key_env names the variable)")
        return key


@dataclasses.dataclass
class Stats:
    """What a Client did, over all its calls. A row is counted once: cached (answered from the cache with no
    request) or not, and failed when it ended with no valid reply. requested counts HTTP requests (retries and
    re-asked malformed replies included), retried those sent after an error, malformed the replies the
    validator rejected (cached ones included)."""
    rows: int = 0
    cached: int = 0
    requested: int = 0
    retried: int = 0
    malformed: int = 0
    failed: int = 0

    def summary(self) -> str:
        return (f"{self.rows} rows: {self.cached} from the cache, {self.requested} requests ({self.retried} "
                f"retried), {self.malformed} malformed replies, {self.failed} rows failed")


# ---------------------------------------------------------------------------------------------------------------
# Requests as cache keys.
# ---------------------------------------------------------------------------------------------------------------
def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def chat_request(settings: LLMSettings, messages: Messages) -> dict:
    """The request sent (and keyed): {model, messages, temperature, max_tokens}."""
    cleaned = []
    for message in messages:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"a chat message needs string 'role' and 'content', got {dict(message)!r}")
        cleaned.append({"role": message["role"], "content": message["content"]})
    return {"model": settings.model, "messages": cleaned, "temperature": float(settings.temperature),
            "max_tokens": int(settings.max_tokens)}


def request_key(request: dict, attempt: int = 0) -> str:
    """sha256 of the canonical JSON of `request`, with "attempt": n added for attempts n > 0 (module docstring)."""
    keyed = {**request, "attempt": attempt} if attempt else request
    return hashlib.sha256(canonical_json(keyed).encode("utf-8")).hexdigest()


def non_empty(reply: str) -> str | None:
    """The default validator: the stripped reply, None when it is empty."""
    return reply.strip() or None


# ---------------------------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------------------------
class ReplyCache:
    """Replies by request key in a SQLite file (":memory:" for none); thread-safe, every put committed at once."""

    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, attempt INTEGER NOT NULL, "
                             "request TEXT NOT NULL, reply TEXT NOT NULL)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{path}: not a reply cache (SQLite: {e}); move the file away to start a new "
                            "cache") from None

    def get(self, key: str) -> str | None:
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"{self.path}: the reply cache is closed")
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, attempt: int, request: dict, reply: str) -> None:
        with self._lock:
            if self._db is None:  # closed while a stopped worker's last request was in flight
                return
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (key, attempt, canonical_json(request), reply))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# ---------------------------------------------------------------------------------------------------------------
# The client.
# ---------------------------------------------------------------------------------------------------------------
def import_openai():
    try:
        import openai
    except ImportError:
        raise UserError("an openai: system needs the openai package: pip install openai") from None
    return openai


def retry_after_s(headers) -> float | None:
    """The delay a server asks for (retry-after-ms, or Retry-After in seconds or as an HTTP date), else None."""
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def server_message(error) -> str:
    """An APIStatusError's message as the server wrote it (the `error.message` of its JSON body, else the body)."""
    body = error.body
    if isinstance(body, Mapping):
        return body["message"] if isinstance(body.get("message"), str) else canonical_json(body)
    if isinstance(body, str) and body.strip():
        return body
    return error.message


def status_hint(status: int, settings: LLMSettings) -> str:
    if status in (401, 403):
        return f"; check the key in the environment variable {settings.api_key_env}"
    if status == 404:
        return f"; check the model name and config.{settings.field}.base_url"
    return ""


class Client:
    """Chat requests to one endpoint and model, answered from the cache at `cache_path` where it can (None: no
    cache kept). Use as a context manager, or call close()."""

    def __init__(self, settings: LLMSettings, cache_path: str | None):
        self.settings = settings
        key = settings.api_key()
        self._secret = key  # only to redact it from server messages
        self.cache = ReplyCache(cache_path or ":memory:")
        self.stats = Stats()
        self._openai = import_openai()
        self._api = self._openai.OpenAI(base_url=settings.base_url, api_key=key, max_retries=0,
                                        timeout=settings.timeout_s)
        self._lock = threading.Lock()
        self._sent = 0
        self._random = random.Random()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.settings!r}, cache={self.cache.path!r})"

    def close(self) -> None:
        self.cache.close()
        self._api.close()

    # -- many rows ------------------------------------------------------------------------------------------------
    def complete_many(self, requests: Sequence[Messages], desc: str = "llm", validate: Validator | None = None,
                      attempts: int = 3) -> list[str | None]:
        """The validated reply of every request, in input order (None: no valid reply in `attempts` requests), with
        settings.concurrency requests in flight and a progress bar. An LLMError of one row stops the others (what
        was answered stays cached) and is raised."""
        validate = validate or non_empty
        requests = list(requests)
        results: list[str | None] = [None] * len(requests)
        stop = threading.Event()  # set when a row fails: no new requests, backoff waits end at once
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.settings.concurrency, max(1, len(requests))),
                                                     thread_name_prefix="llm")
        futures = {pool.submit(self._row, messages, validate, attempts, stop): n
                   for n, messages in enumerate(requests)}
        error = None
        try:
            with tqdm.tqdm(total=len(requests), desc=desc, unit="row", leave=False) as bar:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
        except BaseException as e:
            error = e
            stop.set()
            raise
        finally:
            # After an error, wait for the requests in flight (at most timeout_s) so their replies are cached;
            # not after Ctrl-C.
            pool.shutdown(wait=not isinstance(error, KeyboardInterrupt), cancel_futures=True)
        return results

    # -- one row ---------------------------------------------------------------------------------------------------
    def complete(self, messages: Messages, validate: Validator | None = None, attempts: int = 3) -> str | None:
        """The validated reply to one request: cached attempts first, then at most `attempts` new requests."""
        return self._complete(messages, validate or non_empty, attempts, threading.Event())

    def _row(self, messages: Messages, validate: Validator, attempts: int, stop: threading.Event) -> str | None:
        """A row of complete_many; its error stops the other workers at once (before they take another row)."""
        try:
            return self._complete(messages, validate, attempts, stop)
        except BaseException:
            stop.set()
            raise

    def _complete(self, messages: Messages, validate: Validator, attempts: int, stop: threading.Event) -> str | None:
        request = chat_request(self.settings, messages)
        attempt, asked = 0, 0
        while True:
            key = request_key(request, attempt)
            reply = self.cache.get(key)
            if reply is None:
                if asked == attempts:
                    self._count(rows=1, failed=1)
                    return None
                reply = self._send(request, stop)
                asked += 1
                self.cache.put(key, attempt, request, reply)
            text = validate(reply)
            if text is not None:
                self._count(rows=1, cached=int(asked == 0))
                return text
            self._count(malformed=1)
            attempt += 1

    def _count(self, **counts) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _take_budget(self) -> None:
        with self._lock:
            budget = self.settings.max_requests
            if budget and self._sent >= budget:
                raise LLMError(f"the request budget config.{self.settings.field}.max_requests={budget} is spent; "
                               f"the replies so far are cached in {self.cache.path}: rerun with a larger budget to "
                               "go on")
            self._sent += 1

    def _redact(self, text: str) -> str:
        text = " ".join(str(text).replace(self._secret, "<key>").split())
        return text if len(text) <= MAX_SERVER_MESSAGE else text[:MAX_SERVER_MESSAGE] + " ..."

    def _send(self, request: dict, stop: threading.Event) -> str:
        """One reply's text (content "" when it has none), retried on what may pass (module docstring)."""
        s, openai = self.settings, self._openai
        where = f"{s.base_url}: model {s.model}"
        for retry in range(s.max_retries + 1):
            if stop.is_set():
                raise _Stopped()
            self._take_budget()
            self._count(requested=1, retried=int(retry > 0))
            delay = None
            try:
                return reply_text(self._api.chat.completions.create(**request))
            except openai.APIStatusError as e:
                problem = f"HTTP {e.status_code}: {self._redact(server_message(e))}"
                if e.status_code not in RETRY_STATUSES and e.status_code < 500:
                    raise LLMError(f"{where}: {problem}{status_hint(e.status_code, s)}") from None
                delay = retry_after_s(e.response.headers)
            except openai.APITimeoutError:
                problem = f"no reply within {s.timeout_s} s (config.{s.field}.timeout_s)"
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                problem = f"connection error ({self._redact(f'{type(cause).__name__}: {cause}')})"
            except (json.JSONDecodeError, NotAChatCompletion) as e:
                problem = f"HTTP 200 but no chat completion ({self._redact(e)})"
            if retry == s.max_retries:
                break
            wait = self._delay(retry, delay)
            log.info("%s: %s; retry %d of %d in %.1f s", where, problem, retry + 1, s.max_retries, wait)
            if stop.wait(wait):
                raise _Stopped()
        raise LLMError(f"{where}: no reply after {s.max_retries + 1} attempts, the last: {problem}; try again later "
                       f"or raise config.{s.field}.max_retries (answered rows are cached)")

    def _delay(self, retry: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.max_backoff_s)
        delay = min(s.max_backoff_s, s.backoff_s * 2 ** retry)
        return delay / 2 + self._random.uniform(0, delay / 2)


class NotAChatCompletion(ValueError):
    """A 200 reply whose JSON has no choices."""


def reply_text(completion) -> str:
    """The first choice's message content ("" when there is none: a refusal or a tool call)."""
    choices = getattr(completion, "choices", None)
    if not choices:
        raise NotAChatCompletion("no choices in the reply")
    return choices[0].message.content or ""
