"""sampling/rewriter.py, a trained model as a prompt rewriter (the eval's model: system, the chat): greedy rewrites
against transformers' greedy generate on the tiny SFT export, row independence of batching with typical sampling,
and prompts longer than the budget."""
import pytest
import torch
import transformers

from diffchat_jax.data import examples as examples_lib, tokenize
from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.errors import ConfigError
from diffchat_jax.models import bloom
from diffchat_jax.sampling import rewriter as rewriter_lib, rollout


@pytest.fixture(scope="module")
def rows():
    return examples_lib.load_examples(SAMPLE_PATH)[0][-6:]


def test_greedy_rewrites_are_transformers_greedy_generations(sft_dir, rows):
    """Each row alone through transformers (no padding) gives the text the rewriter gives for the rows batched,
    left-padded to its bucket and split into chunks of 4 (the last one padded)."""
    decoding = rewriter_lib.Decoding(greedy=True, max_new_tokens=24, batch_size=4)
    rewriter = rewriter_lib.Rewriter.load(sft_dir, decoding)
    out = rewriter.rewrite([r.x for r in rows], [r.i for r in rows])
    folder = bloom.resolve_model_dir(sft_dir)
    tokenizer = rewriter.tokenizer
    model = transformers.BloomForCausalLM.from_pretrained(folder).eval()
    banned = [[t] for t in rollout.banned_special_ids(tokenizer)]
    for row, text, length in zip(rows, out.texts, out.lengths):
        ids = torch.tensor([tokenize.encode(tokenizer, [tokenize.render_prompt(row.x, row.i)])[0]])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       bad_words_ids=banned or None)[0, ids.shape[1]:]
        assert len(generated) == length  # EOS included, as the rewriter counts
        assert tokenizer.decode(generated, skip_special_tokens=True).strip() == text
    assert out.truncated == [False] * len(rows) and any(out.texts)


def test_typical_sampling_rows_do_not_depend_on_the_batching(sft_dir, rows):
    xs, instructions = [r.x for r in rows], [r.i for r in rows]
    sample = lambda **kw: rewriter_lib.Rewriter.load(sft_dir, rewriter_lib.Decoding(
        greedy=False, typical_mass=0.9, max_new_tokens=24, **kw))
    whole = sample(batch_size=16).rewrite(xs, instructions).texts
    chunked = sample(batch_size=2)
    assert chunked.rewrite(xs, instructions).texts == whole
    assert chunked.rewrite(xs[3:], instructions[3:], positions=[3, 4, 5]).texts == whole[3:]  # a subset, in place
    assert sample(batch_size=16, seed=1).rewrite(xs, instructions).texts != whole


def test_a_prompt_over_the_budget_keeps_the_start_of_x(sft_dir, rows):
    budget = max(len(rewriter_lib.Rewriter.load(sft_dir).prompt_ids(r.x, r.i)[0]) for r in rows[:2]) + 8
    rewriter = rewriter_lib.Rewriter.load(sft_dir, rewriter_lib.Decoding(max_new_tokens=8, max_prompt_tokens=budget))
    long_x = " ".join([rows[0].x] * 40)
    ids, cut = rewriter.prompt_ids(long_x, rows[0].i)
    assert cut and budget - 8 < len(ids) <= budget
    assert rewriter.tokenizer.decode(ids).endswith(f"Modification: {rows[0].i}\nOutput:")
    out = rewriter.rewrite([long_x, rows[1].x], [rows[0].i, rows[1].i])
    assert out.truncated == [True, False] and len(out.texts) == 2
    with pytest.raises(ConfigError, match="decoding.max_prompt_tokens"):
        rewriter.prompt_ids("a cat", "make it " + "very " * 200 + "snowy")
    assert max(out.lengths) <= 8


def test_streamed_rewrite_gives_the_same_tokens_and_grows_in_order(sft_dir, rows):
    """rewrite_streamed: the callback inside the jitted loop sees the text grow token by token, ends on the text
    `rewrite` gives, and leaves it unchanged (greedy and seeded typical sampling)."""
    for decoding in (rewriter_lib.Decoding(greedy=True, max_new_tokens=24),
                     rewriter_lib.Decoding(greedy=False, typical_mass=0.9, seed=3, max_new_tokens=24)):
        rewriter = rewriter_lib.Rewriter.load(sft_dir, decoding)
        for row in rows[:3]:
            seen = []
            streamed = rewriter.rewrite_streamed(row.x, row.i, seen.append)
            plain = rewriter.rewrite([row.x], [row.i])
            assert streamed == plain
            if plain.texts[0]:
                assert seen and seen[-1] == plain.texts[0]
                assert all(b.startswith(a) and b != a for a, b in zip(seen, seen[1:]))
                assert len(seen) > 1  # token by token, not the whole at the end
            assert "\ufffd" not in "".join(seen)
