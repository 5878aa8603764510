"""The jitted rollout vs transformers (greedy generate, logits processors), its statistics, ADM pi+ / pi-, padding,
EOS and 8 devices."""
import collections
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from transformers.generation import logits_process as hf

from diffchat_jax.configs import base
from diffchat_jax.models import bloom
from diffchat_jax.sampling import rollout
from diffchat_jax.utils.validate import ConfigError
from tests.test_bloom import PAD, left_padded, random_hf_model, torch_logits
from tests.test_sampling_logits import chi_square

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
EOS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(torch model, the folder it was saved to)."""
    torch_model = random_hf_model(seed=1, vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    with torch.no_grad():
        # Larger block outputs and final scale: a few likely tokens per step that depend on the context, as in a
        # trained model, rather than a nearly uniform distribution that favours repeating the last token.
        for name, p in torch_model.named_parameters():
            if "dense" in name and name.endswith("weight"):
                p.mul_(4)
        torch_model.transformer.ln_f.weight.mul_(3)
    folder = tmp_path_factory.mktemp("bloom")
    torch_model.save_pretrained(folder)
    return torch_model, str(folder)


@pytest.fixture(scope="module")
def models(checkpoint):
    """(torch model, Flax module, params) with the same weights."""
    return (checkpoint[0], *bloom.load_pretrained(checkpoint[1]))


def generate(models, ids, mask, config, seed=0, plan=None):
    _, module, params = models
    return jax.device_get(rollout.generate(module, params, ids, mask, jax.random.key(seed), config, plan))


def response_mask(tokens, eos):
    """1 up to and including the first EOS."""
    is_eos = tokens == eos
    return (np.cumsum(is_eos, 1) - is_eos == 0).astype(np.int32)


def make_plan(batch, negatives, ban=(), steer=(), rows=3, length=3):
    """A Plan with the same ban rows and (from, to) steer rows in each of the `negatives` samples."""
    arrays = {name: np.full((batch, rows, length), -1, np.int32) for name in ("ban", "steer_from", "steer_to")}
    for b in negatives:
        for k, row in enumerate(ban):
            arrays["ban"][b, k, :len(row)] = row
        for k, (source, target) in enumerate(steer):
            arrays["steer_from"][b, k, :len(source)] = source
            arrays["steer_to"][b, k, :len(target)] = target
    return rollout.Plan(negative=np.isin(np.arange(batch), negatives), **arrays)


def rows_of(plan_rows):
    """The used rows of a [K, L] plan array as lists."""
    return [row[row >= 0].tolist() for row in plan_rows if row[0] >= 0]


def contains(response, sequence):
    return any(response[i:i + len(sequence)] == sequence for i in range(len(response) - len(sequence) + 1))


# ----- transformers ----------------------------------------------------------------------------------------------
def hf_generate(torch_model, ids, mask, **kwargs):
    with torch.no_grad():
        out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                   pad_token_id=PAD, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate_with_eos_and_left_padding(models):
    torch_model = models[0]
    ids, mask = left_padded(np.random.default_rng(0), VOCAB, [7, 4, 1, 6], 7)
    free = hf_generate(torch_model, ids, mask, max_new_tokens=10, eos_token_id=None)
    # A token greedy decoding emits mid-way, not before: rows stop at different steps.
    eos = next(int(row[t]) for row in free for t in range(2, 10) if row[t] not in row[:t] and row[t] != PAD)
    lengths = []
    for min_new_tokens in (0, 5):
        expected = hf_generate(torch_model, ids, mask, max_new_tokens=10, min_new_tokens=min_new_tokens,
                               eos_token_id=eos)
        config = rollout.SamplingConfig(max_new_tokens=10, min_new_tokens=min_new_tokens, eos_id=eos, pad_id=PAD,
                                        greedy=True, top_p=0.5)  # greedy skips the warpers, as transformers does
        out = generate(models, ids, mask, config)
        n = expected.shape[1]  # transformers stops when every row is done
        assert_array_equal(out.tokens[:, :n], expected)
        assert (out.tokens[:, n:] == PAD).all()
        assert_array_equal(out.mask, response_mask(out.tokens, eos))
        assert (out.tokens[:, :min_new_tokens] != eos).all()
        lengths.append(out.mask.sum(1))
    assert lengths[0].min() < 10 == lengths[0].max()  # some rows stopped, not all
    assert (lengths[1] > 5).all() and (lengths[1] != lengths[0]).any()


def reference_logprobs(torch_model, ids, mask, out, config, plan):
    """Replays a rollout step by step with transformers' logits processors (same order) and the ADM contract of
    diffchat_jax/text/adm.py written out plainly. Checks that every token is possible under its step's
    distribution and that steering and forcing are obeyed; returns the expected log-probs [B, N] and counts of the
    ADM events seen."""
    prompt_len = ids.shape[1]
    logits = torch_logits(torch_model, np.concatenate([ids, out.tokens], 1), np.concatenate([mask, out.mask], 1))
    warpers = [hf.TemperatureLogitsWarper(config.temperature), hf.TopKLogitsWarper(config.top_k),
               hf.TopPLogitsWarper(config.top_p)]
    expected = np.zeros(out.tokens.shape, np.float32)
    events = {"banned": 0, "steered": 0, "forced": 0}
    for b in range(len(ids)):
        steers = {}  # first token -> the steer_to row; the lowest row wins
        for source, target in zip(rows_of(plan.steer_from[b]), rows_of(plan.steer_to[b])):
            steers.setdefault(source[0], target)
        queue = []
        for t in np.flatnonzero(out.mask[b]):
            token, response = int(out.tokens[b, t]), out.tokens[b, :t].tolist()
            if queue:  # forced: no transform, no ban, no steer
                assert token == queue.pop(0) and out.steered[b, t]
                events["forced"] += 1
                continue
            x = torch.from_numpy(logits[b, prompt_len - 1 + t].copy())[None]
            if t < config.min_new_tokens:
                x[0, config.eos_id] = -np.inf
            for row in rows_of(plan.ban[b]):
                if len(row) == 1 or response[-(len(row) - 1):] == row[:-1]:
                    events["banned"] += bool(np.isfinite(x[0, row[-1]]))
                    x[0, row[-1]] = -np.inf
            for warper in warpers:
                x = warper(None, x)
            if not plan.negative[b]:
                x = hf.TypicalLogitsWarper(config.typical_mass)(None, x)
            logp = torch.log_softmax(x, -1)[0].numpy()
            sources = [source for source, target in steers.items() if target[0] == token]
            terms = [logp[s] for s in sources] + ([] if token in steers else [logp[token]])
            expected[b, t] = np.logaddexp.reduce(terms)
            assert np.isfinite(expected[b, t]), (b, t)
            if out.steered[b, t]:  # a drawn first token replaced: queue the rest of its target
                assert len(sources) == 1
                queue = steers[sources[0]][1:]
                events["steered"] += 1
    return expected, events


@pytest.fixture(scope="module")
def full_runs(models, adm_runs):
    """Every transform, min-length, and both ADM policies (samples 0..7 are pi- negatives), over 2 seeds."""
    rng = np.random.default_rng(1)
    ids, mask = left_padded(rng, VOCAB, rng.integers(1, 9, 16), 8)
    a, b, c, d, e, f, eos = adm_runs["common"][:7]  # frequent tokens: every rule comes into play
    # Rows 1 and 2 start with the same token: the lower one wins. The steer targets share no first token.
    plan = make_plan(16, range(8), ban=[[a], [b, c], [d, e, b]],
                     steer=[([f, a], [40, 41, 42]), ([f], [43]), ([c], [44, 45])])
    config = dict(max_new_tokens=16, min_new_tokens=2, eos_id=eos, pad_id=PAD, temperature=0.8, top_k=40,
                  top_p=0.97, typical_mass=0.9)
    outs = [generate(models, ids, mask, rollout.SamplingConfig(**config), seed, plan) for seed in range(2)]
    return dict(ids=ids, mask=mask, plan=plan, config=config, outs=outs)


def test_logprobs_are_the_transformed_distribution_at_the_chosen_tokens(models, full_runs):
    """Every token is possible, steering and forcing follow the contract, and the log-probs are those of
    transformers' processors (pi+ typical on the positives, pi- bans and steers on the negatives)."""
    counts = collections.Counter()
    config = rollout.SamplingConfig(**full_runs["config"])
    for out in full_runs["outs"]:
        expected, events = reference_logprobs(models[0], full_runs["ids"], full_runs["mask"], out, config,
                                              full_runs["plan"])
        np.testing.assert_allclose(out.logprobs, expected, atol=2e-5)
        assert_array_equal(out.mask, response_mask(out.tokens, config.eos_id))
        assert (out.tokens[out.mask == 0] == PAD).all() and not out.steered[8:].any()
        counts.update(events)
    assert min(counts.values()) > 0, counts  # bans bit, tokens were steered and forced
    assert (full_runs["outs"][0].mask.sum(1) < config.max_new_tokens).any()  # and some samples ended


def test_first_token_frequencies_match_the_transformed_distribution(models):
    """20,000 draws of the first token of one prompt (its most likely token banned): Pearson's chi-square against
    the transformed distribution passes at six standard deviations and fails without the transforms."""
    ids, mask = left_padded(np.random.default_rng(2), VOCAB, [5], 5)
    last = torch.from_numpy(torch_logits(models[0], ids, mask)[:, -1])
    best = int(last.argmax())
    config = rollout.SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=0.7, top_p=0.8,
                                    banned_ids=(best,))
    n = 20_000
    out = generate(models, ids.repeat(n, 0), mask.repeat(n, 0), config, seed=3)
    counts = np.bincount(out.tokens[:, 0], minlength=VOCAB)

    def distribution(*processors):
        x = last
        for processor in processors:
            x = processor(torch.zeros((1, 1), dtype=torch.long), x)
        return torch.softmax(x, -1)[0].numpy()

    statistic, dof = chi_square(counts, distribution(hf.NoBadWordsLogitsProcessor([[best]], EOS),
                                                     hf.TemperatureLogitsWarper(0.7), hf.TopPLogitsWarper(0.8)))
    limit = dof + 6 * np.sqrt(2 * dof)
    assert statistic < limit, (statistic, limit)
    assert 0.05 < (counts > 0).mean() < 0.95  # top-p removed some tokens, not all
    for wrong in (distribution(), distribution(hf.TemperatureLogitsWarper(0.7))):
        assert chi_square(np.where(wrong > 0, counts, 0), wrong)[0] > 10 * limit


# ----- ADM ---------------------------------------------------------------------------------------------------------
def test_adm_state_machine_on_hand_made_rows():
    plan = make_plan(2, [0], ban=[[5, 6, 7], [8], [5, 9]], steer=[([10, 11], [12, 13]), ([10], [14]), ([15], [16])])
    rules = jax.jit(rollout.make_rules)(plan)
    banned_tokens, emitted_logprob = jax.jit(rollout.banned_tokens), jax.jit(rollout.emitted_logprob)
    banned = lambda recent: set(np.asarray(banned_tokens(rules, np.array([recent, recent])))[0]) - {-1}
    assert banned([-1, -1]) == {8}  # nothing emitted yet: only the one-token row
    assert banned([-1, 5]) == {8, 9}
    assert banned([5, 6]) == {7, 8}
    assert banned([6, 5]) == {8, 9}
    assert banned([4, 6]) == {8}
    assert np.asarray(banned_tokens(rules, np.array([[5, 6], [5, 6]])))[1].max() == -1  # unplanned
    assert_array_equal(rules.steer_first, [[10, -1, 15], [-1, -1, -1]])  # 10 twice: the lower row wins

    logp = np.log(np.full((2, 20), 0.05, np.float32))
    emitted = np.asarray(emitted_logprob(logp, np.array([12, 12]), rules))
    np.testing.assert_allclose(np.exp(emitted), [0.1, 0.05], rtol=1e-5)  # 12 and 10 -> 12; unplanned: its own
    np.testing.assert_allclose(np.exp(emitted_logprob(logp, np.array([16, 3]), rules)), [0.1, 0.05], rtol=1e-5)


@pytest.fixture(scope="module")
def adm_runs(models):
    """Sampling (top-p, no typical: negatives and positives then share one distribution, so a steered response
    equals the unsteered one up to the steer) with no plan, a removal plan and a replacement plan for samples
    0..7 of 16, over 6 seeds; the keywords are the most frequent tokens of the unplanned responses."""
    rng = np.random.default_rng(5)
    ids, mask = left_padded(rng, VOCAB, rng.integers(1, 9, 16), 8)
    config = rollout.SamplingConfig(max_new_tokens=16, eos_id=EOS, pad_id=PAD, top_p=0.95)
    seeds = range(6)
    free = [generate(models, ids, mask, config, seed) for seed in seeds]
    tokens = np.concatenate([out.tokens[:8][out.mask[:8] > 0] for out in free])
    common = [int(t) for t in np.bincount(tokens, minlength=VOCAB).argsort()[::-1] if t != EOS]
    w, a, f = common[:3]
    bigrams = [(x, y) for out in free for row, n in zip(out.tokens[:8], out.mask[:8].sum(1))
               for x, y in zip(row[:n - 1], row[1:n]) if {x, y}.isdisjoint({w, f})]
    pair = list(max(set(bigrams), key=bigrams.count))
    target = [t for t in common[::-1] if t not in (w, f, *pair)][:3]  # the rarest tokens: easy to tell apart
    removal = make_plan(16, range(8), ban=[[w], pair])
    replacement = make_plan(16, range(8), steer=[([f, a], target)])  # a two-token keyword, steered at its start
    runs = {name: [generate(models, ids, mask, config, seed, plan) for seed in seeds]
            for name, plan in (("removal", removal), ("replacement", replacement))}
    return dict(ids=ids, mask=mask, config=config, free=free, common=common, w=w, pair=pair, f=f, target=target,
                **runs)


def responses(out, rows):
    return [row[:n].tolist() for row, n in zip(out.tokens[rows], out.mask[rows].sum(1))]


def test_adm_removal_never_emits_the_keyword_and_leaves_unplanned_samples_unchanged(adm_runs):
    w, pair = adm_runs["w"], adm_runs["pair"]
    before = [r for out in adm_runs["free"] for r in responses(out, slice(8))]
    after = [r for out in adm_runs["removal"] for r in responses(out, slice(8))]
    assert sum(w in r for r in before) > 10 and sum(contains(r, pair) for r in before) > 0  # a real test
    assert not any(w in r or contains(r, pair) for r in after)
    assert sum(pair[0] in r for r in after) > 0  # a two-token row bans its second token only after its first
    for free, planned in zip(adm_runs["free"], adm_runs["removal"]):
        for field in ("tokens", "mask", "logprobs", "steered"):
            assert_array_equal(getattr(planned, field)[8:], getattr(free, field)[8:])


def test_adm_replacement_puts_the_replacement_wherever_the_keyword_would_be(adm_runs):
    f, target = adm_runs["f"], adm_runs["target"]
    replaced = 0
    for free, planned in zip(adm_runs["free"], adm_runs["replacement"]):
        for b, (before, after) in enumerate(zip(responses(free, slice(8)), responses(planned, slice(8)))):
            assert f not in after
            if f in before:
                j = before.index(f)
                assert after[:j] == before[:j] and after[j:j + 3] == target[:len(after) - j]
                assert planned.steered[b, j:j + 3].all() and (planned.logprobs[b, j + 1:j + 3] == 0).all()
                replaced += 1
            else:
                assert after == before
        assert_array_equal(planned.tokens[8:], free.tokens[8:])
    assert replaced > 10


# ----- padding, devices, config ----------------------------------------------------------------------------------
def test_extra_left_padding_changes_nothing(models, adm_runs):
    ids, mask, config = adm_runs["ids"], adm_runs["mask"], adm_runs["config"]
    wider_ids = np.concatenate([np.full((16, 3), PAD, np.int32), ids], 1)
    wider_mask = np.concatenate([np.zeros((16, 3), np.int32), mask], 1)
    for seed in (0, 1):
        out, free = generate(models, wider_ids, wider_mask, config, seed), adm_runs["free"][seed]
        assert_array_equal(out.tokens, free.tokens)
        np.testing.assert_allclose(out.logprobs, free.logprobs, atol=1e-5)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from diffchat_jax.models import bloom
    from diffchat_jax.sampling import rollout
    from diffchat_jax.utils import mesh as mesh_lib
    folder, inputs, config, outputs = sys.argv[1:]
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh()
    module, params = bloom.load_pretrained(folder)
    data = dict(np.load(inputs))
    ids, mask, plan = mesh_lib.shard_batch((data.pop("ids"), data.pop("mask"), rollout.Plan(**data)), mesh)
    out = rollout.generate(module, mesh_lib.replicate(params, mesh), ids, mask, jax.random.key(0),
                           rollout.SamplingConfig(**json.loads(config)), plan)
    assert out.tokens.sharding.is_equivalent_to(mesh_lib.data_sharded(mesh), 2)  # split over the 8 devices
    assert len(out.tokens.addressable_shards) == 8
    assert out.tokens.addressable_shards[0].data.shape[0] == len(out.tokens) // 8
    np.savez(outputs, **vars(jax.device_get(out)))
""")


def test_eight_devices_give_the_same_rollout_as_one(checkpoint, full_runs, tmp_path):
    np.savez(tmp_path / "in.npz", ids=full_runs["ids"], mask=full_runs["mask"], **vars(full_runs["plan"]))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    args = [checkpoint[1], tmp_path / "in.npz", json.dumps(full_runs["config"]), tmp_path / "out.npz"]
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    eight, one = np.load(tmp_path / "out.npz"), full_runs["outs"][0]  # seed 0 on this process's one device
    for field in ("tokens", "mask", "steered"):
        assert_array_equal(eight[field], getattr(one, field))
    np.testing.assert_allclose(eight["logprobs"], one.logprobs, atol=1e-5)


def test_config_from_base_and_errors():
    config = rollout.SamplingConfig.from_config(base.get_config().sampling, eos_id=EOS, pad_id=PAD)
    assert config.typical_mass == 0.97 and config.order == rollout.ORDER and config.active == ("ban", "typical")
    assert rollout.SamplingConfig(8, EOS, PAD, greedy=True, typical_mass=0.9, min_new_tokens=2).active == (
        "min_new_tokens", "ban")
    for field, value, message in [("top_p", 0.0, "top_p must be in"), ("temperature", 0.0, "temperature must be"),
                                  ("min_new_tokens", 9, "min_new_tokens must be"),
                                  ("order", ("top_p", "typical"), "order must name each")]:
        with pytest.raises(ConfigError, match=f"config.sampling.{message}"):
            rollout.SamplingConfig(8, EOS, PAD, **{field: value})


@pytest.mark.slow
def test_plans_from_the_adm_planner_end_to_end(tmp_path):
    """Real plans (diffchat_jax.text.adm on the shipped sample, a byte-level BPE) through Plan.from_adm: no banned
    keyword spelling completes, no steered first token is ever emitted as drawn, unplanned samples are unchanged."""
    from diffchat_jax.data import SAMPLE_PATH, examples as examples_lib, tokenize, tokenizer as tokenizer_lib
    from diffchat_jax.text import adm, integrity, keywords
    if not keywords.wordnet_available():
        pytest.skip("NLTK WordNet is not installed: run `python -m diffchat_jax.text.nltk_data`")
    examples = examples_lib.load_examples(SAMPLE_PATH)[0][:32]
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.sample_corpus(examples), 400, tmp_path)
    vocab = adm.build_vocab([e.y for e in examples], keywords.KeywordConfig(tagger="pattern"))
    adm_config = base.get_config().adm
    plan = adm.make_plans([integrity.ci_reference(e)[2] for e in examples], vocab, tokenizer, seed=0,
                          negative_fraction=0.5, max_sequences=adm_config.max_sequences,
                          max_tokens=adm_config.max_tokens)
    assert 4 < plan.negative.sum() < 28 and plan.ban.shape[1:] == (8, 8)
    prompts = tokenize.encode(tokenizer, [tokenize.render_prompt(e.x, e.i) for e in examples])
    width = max(map(len, prompts))
    ids = np.array([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)

    config = bloom.BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)
    module, params = bloom.Bloom(config), bloom.init_params(config, jax.random.key(0))
    sampling = rollout.SamplingConfig(max_new_tokens=24, eos_id=tokenizer.eos_token_id,
                                      pad_id=tokenizer.pad_token_id, typical_mass=0.97)
    run = lambda p: jax.device_get(rollout.generate(module, params, ids, mask, jax.random.key(1), sampling, p))
    free, planned = run(None), run(rollout.Plan.from_adm(plan))
    unplanned = ~plan.negative
    assert_array_equal(planned.tokens[unplanned], free.tokens[unplanned])
    for b in np.flatnonzero(plan.negative):
        response = planned.tokens[b, :planned.mask[b].sum()].tolist()
        assert not any(contains(response, row) for row in rows_of(plan.ban[b]))
        firsts = {row[0] for row in rows_of(plan.steer_from[b])}
        assert not any(t in firsts for t, s in zip(response, planned.steered[b]) if not s)
