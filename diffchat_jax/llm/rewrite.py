"""The evaluation's `openai:MODEL` system: a chat LLM, few-shot, writes each row's target prompt y from its input
prompt x and instruction i (the paper's ChatGPT competitor, sec. 4.2: "a prompt modifier given the raw prompt and
instruction").

    targets = rewrite_prompts(examples, LLMSettings.from_config(config.eval.llm, "gpt-4o-mini"), "w/llm_cache.sqlite")

The chat is templates/rewrite.txt: a system message (the task in the words of the paper's InstructPE template T_B,
"Write a new image description given the input and the modification", and what a target prompt keeps), three
few-shot turns written for it, then the row's turn "Input: {x} / Modification: {i} / Output:". A reply is cleaned by
clean_reply (one line, no quotes, no "Output:" label); a malformed one (empty, several lines, a refusal) is asked
again, up to ATTEMPTS requests per row (client.py), and rows still without a target are an LLMError listing them:
a system gives every row a target. Replies are cached (client.py), so a rerun sends no request already answered.
"""
import functools
import hashlib
import os
import re
from typing import Sequence

from diffchat_jax.data.examples import Example
from diffchat_jax.errors import DataError
from diffchat_jax.llm import client as client_lib

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "rewrite.txt")
ATTEMPTS = 3  # requests per row before it counts as failed
MAX_LISTED_ROWS = 10  # failed rows named in the error
HEADER = re.compile(r"^### (system|user|assistant)\s*$")
PLACEHOLDER = re.compile(r"\{([xi])\}")
LABEL = re.compile(r"^(?:output|prompt|target prompt|new prompt|target|answer)\s*:\s*", re.IGNORECASE)
QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))
REFUSAL = re.compile(r"^(?:i'?m sorry|i am sorry|sorry,|i can(?:no|'|\u2019)?t\b|i'?m (?:unable|not able)|"
                     r"i am (?:unable|not able)|as an ai\b)", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def load_template(path: str = TEMPLATE_PATH) -> tuple[tuple[str, str], ...]:
    """The template's messages, (role, content) each; the last is the user turn with {x} and {i}."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    messages: list[list] = []
    for line in lines:
        header = HEADER.match(line)
        if header:
            messages.append([header.group(1), []])
        elif messages:  # text before the first header is a note for readers
            messages[-1][1].append(line)
    messages = [(role, "\n".join(body).strip()) for role, body in messages]
    if not messages or messages[-1][0] != "user" or set(PLACEHOLDER.findall(messages[-1][1])) != {"x", "i"}:
        raise DataError(f"{path}: the last message must be a `### user` turn holding {{x}} and {{i}}")
    return tuple(messages)


def chat_messages(x: str, i: str, template=None) -> list[dict]:
    """The chat of one row: the template with {x} and {i} of its last turn filled in (once each, literally)."""
    *shots, (role, turn) = template or load_template()
    values = {"x": x, "i": i}
    return [*({"role": r, "content": c} for r, c in shots),
            {"role": role, "content": PLACEHOLDER.sub(lambda m: values[m.group(1)], turn)}]


def request_settings(settings: client_lib.LLMSettings) -> dict:
    """What a row's target depends on besides (x, i): the endpoint, model, sampling and template (the eval job
    keys its cached prompts with it). No key, no retry settings."""
    with open(TEMPLATE_PATH, "rb") as f:
        template = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"base_url": settings.base_url, "model": settings.model, "temperature": float(settings.temperature),
            "max_tokens": int(settings.max_tokens), "template": template}


def strip_wrapping(text: str) -> str:
    """Without a leading "Output:"-like label and surrounding quotes (repeated: `Output: "..."`)."""
    while True:
        before = text
        text = LABEL.sub("", text).strip()
        for left, right in QUOTES:
            if len(text) >= 2 and text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)].strip()
        if text == before:
            return text


def clean_reply(reply: str) -> str | None:
    """A reply as a target prompt: one line, no label, quotes or code fence; None when it is malformed (empty,
    several lines, a refusal)."""
    lines = [line.strip() for line in reply.strip().strip("`").splitlines() if line.strip()]
    if len(lines) > 1 and not LABEL.sub("", lines[0]).strip():  # "Output:" on a line of its own
        lines = lines[1:]
    if len(lines) != 1:
        return None
    text = " ".join(strip_wrapping(lines[0]).split())
    if not text or REFUSAL.match(text):
        return None
    return text


def rewrite_prompts(examples: Sequence[Example], settings: client_lib.LLMSettings, cache_path: str | None,
                    row_numbers: Sequence[int] | None = None) -> list[str]:
    """The target prompt of every example (one request each, answered from the cache where it can). row_numbers:
    the rows the error names (default 0 .. len(examples) - 1)."""
    requests = [chat_messages(e.x, e.i) for e in examples]
    with client_lib.Client(settings, cache_path) as client:
        texts = client.complete_many(requests, desc=f"openai:{settings.model}", validate=clean_reply,
                                     attempts=ATTEMPTS)
        print(f"openai:{settings.model}: {client.stats.summary()}")
    rows = list(row_numbers) if row_numbers is not None else list(range(len(examples)))
    failed = [row for row, text in zip(rows, texts) if text is None]
    if failed:
        shown = ", ".join(map(str, failed[:MAX_LISTED_ROWS])) + (" ..." if len(failed) > MAX_LISTED_ROWS else "")
        raise client_lib.LLMError(
            f"openai:{settings.model}: {len(failed)} of {len(texts)} rows got no usable target prompt in {ATTEMPTS} "
            f"replies each (empty, several lines or a refusal; rows {shown}); their replies are in {cache_path}: "
            "rerun to ask again, or use another model")
    return texts
