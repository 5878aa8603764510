"""diffchat_jax/llm against the local fake server (tests/fake_openai.py): replies, retries, errors, the key kept
out of every output, the resumable cache, concurrency, malformed replies and the eval's rewrite system."""
import logging
import secrets
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from diffchat_jax import errors
from diffchat_jax.data.examples import Example
from diffchat_jax.errors import ConfigError, DataError
from diffchat_jax.llm import client as client_lib, rewrite
from diffchat_jax.llm.client import Client, LLMError, LLMSettings
from tests import helpers
from tests.fake_openai import Error, FakeOpenAI, Hang, Reply, Slow, fake_openai  # noqa: F401 (fixture)

KEY_ENV = "DIFFCHAT_TEST_LLM_KEY"
KEY = "sk-test-" + secrets.token_hex(16)  # a fresh secret, so finding it anywhere means it leaked


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def settings(server, **overrides) -> LLMSettings:
    """Fast settings for the fake server: short timeout, tiny backoff, one request at a time."""
    values = dict(base_url=server.url, model="fake-model", api_key_env=KEY_ENV, max_tokens=64, timeout_s=2.0,
                  max_retries=3, backoff_s=0.01, max_backoff_s=1.0, concurrency=1)
    return LLMSettings(**{**values, **overrides})


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def ask(server, cache, texts, **overrides) -> tuple[list, client_lib.Stats]:
    """complete_many of one user message per text, with a fresh Client; (results, its stats)."""
    validate = overrides.pop("validate", None)
    with Client(settings(server, **overrides), str(cache) if cache else None) as client:
        return client.complete_many([chat(t) for t in texts], desc="test", validate=validate), client.stats


# ---------------------------------------------------------------------------------------------------------------
# Replies, retries, errors.
# ---------------------------------------------------------------------------------------------------------------
def test_plain_reply(fake_openai, tmp_path):
    results, stats = ask(fake_openai, tmp_path / "cache.sqlite", ["a cat"])
    assert results == ["reply to: a cat"]
    (received,) = fake_openai.requests
    assert received.path == "/v1/chat/completions"
    assert received.body == {"model": "fake-model", "messages": chat("a cat"), "temperature": 0.0, "max_tokens": 64}
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert (stats.rows, stats.cached, stats.requested, stats.retried, stats.failed) == (1, 0, 1, 0, 0)


def test_server_errors_are_retried_with_retry_after(fake_openai):
    fake_openai.script(Error(500, "boom"), Error(429, "slow down", retry_after="0.3"), Reply("ok"))
    results, stats = ask(fake_openai, None, ["q"])
    assert results == ["ok"]
    first, second, third = fake_openai.requests
    assert first.body == second.body == third.body  # the same request, sent again
    assert third.at - second.at >= 0.3  # the server's Retry-After
    assert second.at - first.at < 0.3  # our own backoff (backoff_s = 0.01)
    assert (stats.requested, stats.retried, stats.failed) == (3, 2, 0)


def test_timeouts_are_retried(fake_openai):
    fake_openai.script(Hang(5), Reply("after the hang"))
    start = time.monotonic()
    assert ask(fake_openai, None, ["q"], timeout_s=0.3)[0] == ["after the hang"]
    assert time.monotonic() - start < 3
    assert len(fake_openai.requests) == 2


def test_gives_up_after_max_retries(fake_openai):
    fake_openai.script(*[Error(503, "overloaded")] * 5)
    with pytest.raises(LLMError) as e:
        ask(fake_openai, None, ["q"], max_retries=2)
    assert "no reply after 3 attempts, the last: HTTP 503: overloaded" in str(e.value)
    assert "max_retries" in str(e.value)
    assert len(fake_openai.requests) == 3


def test_connection_errors_are_retried_then_reported():
    server = FakeOpenAI().start()
    server.stop()  # nothing listens on its port now
    with pytest.raises(LLMError, match=r"no reply after 2 attempts, the last: connection error \(ConnectError"):
        ask(server, None, ["q"], max_retries=1)


@pytest.mark.parametrize("status, message", [(400, "Unrecognized request argument supplied: foo"),
                                             (404, "The model `fake-model` does not exist")])
def test_client_errors_fail_at_once(fake_openai, status, message):
    fake_openai.script(Error(status, message))
    with pytest.raises(LLMError) as e:
        ask(fake_openai, None, ["q"])
    assert f"HTTP {status}: {message}" in str(e.value)
    assert fake_openai.url in str(e.value) and "fake-model" in str(e.value)
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_key_names_the_variable(monkeypatch, tmp_path, value):
    if value is None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", value)
    s = LLMSettings(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ConfigError, match="set OPENAI_API_KEY to the API key of http://127.0.0.1:9/v1"):
        Client(s, str(tmp_path / "cache.sqlite"))
    assert not (tmp_path / "cache.sqlite").exists()  # nothing made before the check


def test_key_appears_in_no_output_file_or_error(fake_openai, tmp_path, capsys, caplog):
    for logger in (None, "openai", "httpx2", "httpcore2", "diffchat_jax"):
        caplog.set_level(logging.DEBUG, logger=logger)
    fake_openai.script(Error(500), Error(429, retry_after="0"), Reply("first"),
                       Error(401, f"Incorrect API key provided: {KEY}."))  # a server that echoes the key
    cache = tmp_path / "cache.sqlite"
    with Client(settings(fake_openai), str(cache)) as client:
        assert client.complete_many([chat("a")], desc="test") == ["first"]
        with pytest.raises(LLMError) as e:
            client.complete_many([chat("b")], desc="test")
        texts = [repr(client), repr(client.settings), str(client.stats)]
    assert "HTTP 401: Incorrect API key provided: <key>." in str(e.value)
    assert "OPENAI_API_KEY" not in str(e.value) and KEY_ENV in str(e.value)  # the hint names the variable
    errors.report(e.value)  # the line a user sees
    assert e.value.__cause__ is None and e.value.__context__ is not None  # raised `from None`: no chain shown
    out, err = capsys.readouterr()
    texts += [str(e.value), repr(e.value), out, err, caplog.text]
    assert "retry 1 of 3" in caplog.text and "Sending HTTP Request" in caplog.text  # ours and openai's captured
    assert all(KEY not in text for text in texts)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cache in files
    assert all(KEY.encode() not in p.read_bytes() for p in files)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake_openai.requests)


# ---------------------------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------------------------
def test_cache_answers_a_second_run_with_the_server_stopped(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAI() as server:
        first, _ = ask(server, cache, ["a", "b", "c"])
    results, stats = ask(server, cache, ["a", "b", "c"], max_retries=0)  # a request would be a connection error
    assert results == first == ["reply to: a", "reply to: b", "reply to: c"]
    assert (stats.rows, stats.cached, stats.requested) == (3, 3, 0)


def test_cache_keeps_rows_answered_before_an_error(fake_openai, tmp_path):
    cache = tmp_path / "cache.sqlite"
    fake_openai.script(Reply("A"), Reply("B"), Error(400, "bad request"))
    with pytest.raises(LLMError, match="HTTP 400"):
        ask(fake_openai, cache, ["a", "b", "c", "d"])
    results, stats = ask(fake_openai, cache, ["a", "b", "c", "d"])
    assert results == ["A", "B", "reply to: c", "reply to: d"]
    assert (stats.cached, stats.requested) == (2, 2)
    assert [r.user_message for r in fake_openai.requests[3:]] == ["c", "d"]


def test_cache_survives_a_kill(fake_openai, tmp_path):
    """A process SIGKILLed while waiting for its third reply keeps the first two."""
    cache = tmp_path / "cache.sqlite"
    fake_openai.script(Reply("A"), Reply("B"), Hang(60))
    script = (f"import sys\nfrom diffchat_jax.llm.client import Client, LLMSettings\n"
              f"s = LLMSettings(base_url=sys.argv[1], model='fake-model', api_key_env={KEY_ENV!r}, max_tokens=64, "
              f"timeout_s=60.0, concurrency=1)\n"
              f"with Client(s, sys.argv[2]) as c:\n"
              f"    c.complete_many([[{{'role': 'user', 'content': t}}] for t in 'abcd'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, fake_openai.url, str(cache)], cwd=helpers.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(fake_openai.requests) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0].decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results, stats = ask(fake_openai, cache, ["a", "b", "c", "d"])
    assert results == ["A", "B", "reply to: c", "reply to: d"]
    assert (stats.cached, stats.requested) == (2, 2)


def test_cache_key_is_the_canonical_request():
    s = LLMSettings(base_url="http://x/v1", model="m", max_tokens=8)
    request = client_lib.chat_request(s, [{"content": "hi", "role": "user"}])
    assert request == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
                       "max_tokens": 8}
    same = client_lib.chat_request(LLMSettings(base_url="http://y/v1", model="m", max_tokens=8, temperature=0,
                                               concurrency=3), chat("hi"))
    assert client_lib.request_key(request) == client_lib.request_key(same)  # int 0 == 0.0; retries, URL aside
    keys = {client_lib.request_key(request, n) for n in range(3)}
    assert len(keys) == 3


def test_not_a_cache_file_is_one_line(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_text("not a database " * 100)
    with pytest.raises(DataError, match=f"{path}: not a reply cache"):
        client_lib.ReplyCache(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Concurrency, budget, malformed replies.
# ---------------------------------------------------------------------------------------------------------------
def test_concurrent_results_come_in_input_order(tmp_path):
    texts = [f"row {n}" for n in range(12)]
    # Later rows answer sooner, so they finish out of order.
    slow = lambda body: Slow(0.01 * (12 - int(body["messages"][-1]["content"].split()[1])), Reply(
        "done " + body["messages"][-1]["content"]))
    with FakeOpenAI(reply=slow) as server:
        results, stats = ask(server, tmp_path / "cache.sqlite", texts, concurrency=4)
    assert results == [f"done {t}" for t in texts]
    assert 2 <= server.max_in_flight <= 4
    assert (stats.rows, stats.requested) == (12, 12)


def test_request_budget(fake_openai, tmp_path):
    cache = tmp_path / "cache.sqlite"
    with pytest.raises(LLMError, match=r"max_requests=2 is spent.*rerun with a larger budget"):
        ask(fake_openai, cache, ["a", "b", "c"], max_requests=2)
    assert len(client_lib.ReplyCache(str(cache))) == 2
    assert ask(fake_openai, cache, ["a", "b", "c"], max_requests=1)[1].requested == 1


def test_malformed_replies_are_asked_again_then_reported(fake_openai, tmp_path):
    cache = tmp_path / "cache.sqlite"
    refusal = "I'm sorry, I can't help with that."
    fake_openai.script(Reply(""), Reply("two\nlines"), Reply('Output: "good"'), *[Reply(refusal)] * 3)
    results, stats = ask(fake_openai, cache, ["a", "b"], validate=rewrite.clean_reply)
    assert results == ["good", None]  # row b: a failure for the caller, not an exception
    assert (stats.requested, stats.malformed, stats.failed) == (6, 5, 1)
    assert all(r.body == fake_openai.requests[0].body for r in fake_openai.requests[:3])  # the same request
    # A rerun reads the cached attempts (no request for row a) and asks row b again under new attempt numbers.
    results, stats = ask(fake_openai, cache, ["a", "b"], validate=rewrite.clean_reply)
    assert results == ["good", "reply to: b"]
    assert (stats.cached, stats.requested, stats.malformed) == (1, 1, 5)
    assert len(client_lib.ReplyCache(str(cache))) == 7


# ---------------------------------------------------------------------------------------------------------------
# Settings and the eval's rewrite system.
# ---------------------------------------------------------------------------------------------------------------
def eval_llm_config(**overrides) -> ml_collections.ConfigDict:
    """eval.llm as configs/eval.py has it."""
    return ml_collections.ConfigDict({**dict(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
                                             temperature=0.0, max_tokens=256, timeout_s=60.0, max_retries=6,
                                             backoff_s=1.0, max_backoff_s=60.0, concurrency=8, max_requests=0),
                                      **overrides})


def test_settings_from_config():
    s = LLMSettings.from_config(eval_llm_config(), "gpt-4o-mini")
    assert (s.model, s.base_url, s.concurrency, s.field) == ("gpt-4o-mini", "https://api.openai.com/v1", 8, "eval.llm")
    with pytest.raises(ConfigError, match=r"^config\.eval\.llm\.concurrency must be >= 1, got 0$"):
        LLMSettings.from_config(eval_llm_config(concurrency=0), "m")
    with pytest.raises(ConfigError, match=r"^config\.eval\.llm\.api_key_env must name an environment variable"):
        LLMSettings.from_config(eval_llm_config(api_key_env="sk-abc 123"), "m")
    with pytest.raises(ConfigError, match="the model name is empty"):
        LLMSettings.from_config(eval_llm_config(), " ")


@pytest.mark.parametrize("headers, expected", [({"retry-after": "2"}, 2.0), ({"retry-after": "0.5"}, 0.5),
                                               ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
                                               ({"retry-after": "soon"}, None), ({}, None)])
def test_retry_after(headers, expected):
    assert client_lib.retry_after_s(headers) == expected


def test_retry_after_date():
    import email.utils
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= client_lib.retry_after_s({"retry-after": later}) <= 30


@pytest.mark.parametrize("reply, expected", [
    ("a red cat, 8k", "a red cat, 8k"), ('Output: "a red cat"', "a red cat"), ("Prompt:  a  red cat ", "a red cat"),
    ("Output:\na red cat", "a red cat"), ("\u201ca red cat\u201d", "a red cat"), ("```\na red cat\n```", "a red cat"),
    ("", None), ("   ", None), ("a red cat\nand a dog", None), ("I'm sorry, but I can't help with that.", None),
    ("I cannot do that", None), ('""', None)])
def test_clean_reply(reply, expected):
    assert rewrite.clean_reply(reply) == expected


def test_template_messages():
    messages = rewrite.chat_messages("a {i} cat", r"make it \1 red")
    assert messages[0]["role"] == "system" and "one line" in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == "Input: a {i} cat\nModification: make it \\1 red\nOutput:"  # filled literally
    assert all("###" not in m["content"] and "{x}" not in m["content"] for m in messages)


def test_rewrite_prompts(fake_openai, tmp_path, capsys):
    def reply(body):  # a chatty model: a label and quotes around "<x>, <i>"
        x, i = (line.split(": ", 1)[1] for line in body["messages"][-1]["content"].splitlines()[:2])
        return 'Output: "I cannot"' if "refuse" in i else f'Output: "{x}, {i}"'

    fake_openai.reply = reply
    examples = [Example(x=f"a photo of a cat {n}", i=f"make it red {n}", y="unused") for n in range(3)]
    s = settings(fake_openai, concurrency=3)
    cache = str(tmp_path / "llm_cache.sqlite")
    assert rewrite.rewrite_prompts(examples, s, cache) == [f"a photo of a cat {n}, make it red {n}" for n in range(3)]
    assert len(fake_openai.requests) == 3
    assert all(r.body["messages"][:-1] == rewrite.chat_messages("x", "i")[:-1] for r in fake_openai.requests)
    assert "openai:fake-model: 3 rows: 0 from the cache, 3 requests" in capsys.readouterr().out
    assert rewrite.request_settings(s) == {"base_url": fake_openai.url, "model": "fake-model", "temperature": 0.0,
                                           "max_tokens": 64, "template": rewrite.request_settings(s)["template"]}

    bad = [examples[0], Example(x="a dog", i="refuse this", y="unused")]
    with pytest.raises(LLMError, match=r"1 of 2 rows got no usable target prompt in 3 replies each .*rows 7\)"):
        rewrite.rewrite_prompts(bad, s, cache, row_numbers=[4, 7])
    assert len(fake_openai.requests) == 3 + 3  # row 4 cached, row 7 asked 3 times
