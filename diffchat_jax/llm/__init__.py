"""Chat LLMs behind an OpenAI-compatible API, offline-testable (tests/fake_openai.py).

    client.py   LLMSettings and Client: cached (SQLite), retried, concurrent chat requests, replies validated
    rewrite.py  the evaluation's `openai:MODEL` system: a few-shot instruction that writes target prompts
"""
