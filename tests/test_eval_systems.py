"""diffchat_jax/eval/systems.py: the target prompts of each kind, the file: format's errors, and CI in the paper's
units on real InstructPix2Pix triples (the `reference` system keeps every keyword: CI 100)."""
import json
import os

import pytest

from diffchat_jax.data import examples as examples_lib
from diffchat_jax.data.examples import Example
from diffchat_jax.errors import ConfigError, DataError
from diffchat_jax.eval import systems
from diffchat_jax.text import keywords
from tests import helpers

ROWS = [Example(x="a castle on a hill", i="make it snow", y="a snowy castle on a hill, winter, highly detailed"),
        Example(x="a cat", i="add a hat", y="a cat wearing a red hat, studio photo")]
IP2P = os.path.join(os.path.dirname(helpers.ROOT), "shared", "data", "ip2p-human-written.jsonl")


def test_each_kind_gives_its_targets(tmp_path):
    specs = systems.parse_systems({"user": "identity", "naive": "append", "data": "reference",
                                   "other": f"file:{tmp_path / 'other.jsonl'}"})
    assert [s.kind for s in specs.values()] == ["identity", "append", "reference", "file"]
    assert systems.fixed_targets(specs["user"], ROWS) == ["a castle on a hill", "a cat"]
    assert systems.fixed_targets(specs["naive"], ROWS) == ["a castle on a hill, make it snow", "a cat, add a hat"]
    assert systems.fixed_targets(specs["data"], ROWS) == [ROWS[0].y, ROWS[1].y]
    (tmp_path / "other.jsonl").write_text('{"row": 1, "target": "a cat in a hat "}\n\n{"row": 0, "target": "snow"}\n')
    assert systems.fixed_targets(specs["other"], ROWS) == ["snow", "a cat in a hat"]


@pytest.mark.parametrize("lines, message", [
    (['{"row": 0, "target": "x"}', "{oops"], r"other.jsonl: line 2: not JSON"),
    (['{"row": 0, "target": "x"}', '{"row": 2, "target": "y"}'], r"line 2: field 'row' must be a test row number "
                                                                 r"0 \.\. 1, got 2"),
    (['{"row": 0, "target": "x"}', '{"row": 1, "target": " "}'], r"line 2: field 'target' must be a non-empty"),
    (['{"row": 0, "target": "x"}', '{"row": 0, "target": "y"}'], r"line 2: row 0 appears twice"),
    (['{"row": 1, "target": "x"}'], r"1 of the 2 test rows have no target \(rows 0\)"),
    (['["row", 0]'], r"line 1: field 'row' must be"),
])
def test_file_errors_name_the_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        systems.fixed_targets(systems.parse_spec("other", f"file:{path}"), ROWS)


def test_bad_specs_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"config.eval.systems.ours: 'gpt4' is not a system"):
        systems.parse_systems({"ours": "gpt4"})
    with pytest.raises(ConfigError, match=r"config.eval.systems.x: 'file': file: needs a path"):
        systems.parse_systems({"x": "file"})
    with pytest.raises(ConfigError, match=r"identity takes no argument"):
        systems.parse_systems({"x": "identity:3"})
    with pytest.raises(ConfigError, match="config.eval.systems is empty"):
        systems.parse_systems({})
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        systems.fixed_targets(systems.parse_spec("x", f"file:{tmp_path / 'nope.jsonl'}"), ROWS)


@pytest.mark.skipif(not os.path.exists(IP2P), reason="../shared/data is not here")
@pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")
def test_ci_in_paper_units_on_real_triples():
    """On InstructPix2Pix's human-written triples the reference system's target is y_o itself: every keyword of the
    edit is there (CI 100); the unchanged input keeps fewer on average."""
    rows, _ = examples_lib.load_examples(IP2P)
    rows = rows[:40]
    config = keywords.KeywordConfig()
    reference = systems.ci_scores(rows, systems.fixed_targets(systems.parse_spec("r", "reference"), rows), config)
    identity = systems.ci_scores(rows, systems.fixed_targets(systems.parse_spec("u", "identity"), rows), config)
    assert reference == [100.0] * len(rows)
    assert all(0.0 <= v <= 100.0 for v in identity) and sum(identity) / len(identity) < 95.0


def test_eval_config_checks_name_the_field():
    from diffchat_jax.configs import eval as eval_config
    from diffchat_jax.eval import job
    config = eval_config.get_config("tiny")
    config.eval.models.tiny = helpers.ROOT  # exists in any checkout: only the setting under test is wrong
    config.render.solver = "plms"
    with pytest.raises(ConfigError, match="config.render.solver"):
        job.validate_config(config)
    config.render.solver = "ddim"
    config.eval.metrics = ("pickscore,ssim",)  # what --config.eval.metrics=pickscore,ssim gives
    with pytest.raises(ConfigError, match=r"config.eval.metrics has unknown name\(s\) \['ssim'\]"):
        job.validate_config(config)
    config.eval.metrics = ("ci",)
    config.eval.systems.user = "file:"
    with pytest.raises(ConfigError, match="config.eval.systems.user: 'file:': file: needs a path"):
        job.validate_config(config)


def test_eval_config_variants():
    from diffchat_jax.configs import eval as eval_config
    assert sorted(eval_config.get_config("tiny").eval.systems) == ["append", "ip2p", "ppo", "reference", "sft", "user"]
    # tiny,baselines: the systems that need no trained model (the evaluation notebook)
    assert sorted(eval_config.get_config("tiny,baselines").eval.systems) == ["append", "ip2p", "reference", "user"]
    with pytest.raises(ConfigError, match="baselines without tiny"):
        eval_config.get_config("baselines")
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['huge'\]"):
        eval_config.get_config("tiny,huge")


def test_openai_system_in_the_eval_job(tmp_path, monkeypatch, capsys):
    """An openai: system end to end against the local fake server (a 500 first, retried): its target prompts in
    prompts/<name>.jsonl and its CI in the results; a rerun sends no request; a missing key stops the job before any
    work, naming the variable; the key is in no file of the workdir."""
    import ml_collections
    from diffchat_jax.configs import eval as eval_config
    from diffchat_jax.eval import job
    from tests.fake_openai import Error, FakeOpenAI

    def reply(body):  # "x, snowy" from the row's turn "Input: x\nModification: i\nOutput:"
        x = body["messages"][-1]["content"].split("\n")[0].removeprefix("Input: ")
        return f"{x}, covered in snow, highly detailed"

    config = eval_config.get_config("tiny")
    config.eval.systems = ml_collections.ConfigDict({"llm": "openai:fake-model", "user": "identity"})
    config.eval.models = ml_collections.ConfigDict()
    config.eval.metrics = ("ci",)
    config.eval.limit = 4
    config.eval.llm.api_key_env = "DIFFCHAT_TEST_KEY"
    config.eval.llm.backoff_s = 0.01
    monkeypatch.delenv("DIFFCHAT_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DIFFCHAT_TEST_KEY is not set"):
        job.run(config, str(tmp_path / "nokey"))
    assert not (tmp_path / "nokey").exists()
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("DIFFCHAT_TEST_KEY", key)
    with FakeOpenAI(reply=reply) as server:
        config.eval.llm.base_url = server.url
        server.script(Error(500, "overloaded"))
        job.run(config, str(tmp_path / "run"))
        assert len(server.requests) == 4 + 1  # one per row, and the retry
        assert all(r.headers["authorization"] == f"Bearer {key}" for r in server.requests)
        job.run(config, str(tmp_path / "run"))
        assert len(server.requests) == 5  # all cached
    lines = [json.loads(l) for l in (tmp_path / "run" / "prompts" / "llm.jsonl").read_text().splitlines()]
    assert [l["target"] for l in lines] == [f"{l['x']}, covered in snow, highly detailed" for l in lines]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert {(r["system"], r["metric"]) for r in results} == {("llm", "ci"), ("user", "ci")}
    for path in (tmp_path / "run").rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path
    assert key not in capsys.readouterr().out
