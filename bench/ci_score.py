"""Throughput of the content-integrity code: prompts per second for `ci_score` and for batched prefix CI (VCI).

  python -m bench.ci_score                  # rollout batches of 128, median of 3 runs

Data: the 500 human-written InstructPix2Pix triples in <repo>/../shared/data when present, as references
(x_o, i, y_o), with y = y_o + the style tags of a real DiffusionDB prompt (what a beautified target prompt looks
like); else the shipped InstructPE sample (y = its beautified target). Prefix CI runs on token ids from a
byte-level BPE (8k vocabulary) trained here on the same texts, with EOS, padded to a batch's longest response.
"new references": the reference cache is emptied first (PPO mostly meets new prompts); "cached": run again.
Lemma and synonym caches are warm in both (a warm-up pass fills them, as a long run does).
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.data.examples import load_examples
from diffchat_jax.data.tokenize import encode, response_text
from diffchat_jax.data.tokenizer import train_bpe_tokenizer
from diffchat_jax.text import integrity as ci
from diffchat_jax.text.keywords import get_tagger

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_cases() -> tuple[str, list[tuple[str, str, str]], list[str]]:
    """(description, references, responses y)."""
    ip2p, diffusiondb = SHARED_DATA / "ip2p-human-written.jsonl", SHARED_DATA / "diffusiondb-prompts.jsonl"
    if ip2p.exists() and diffusiondb.exists():
        examples, _ = load_examples(ip2p)
        with open(diffusiondb, encoding="utf-8") as f:
            styles = [p.split(",", 1)[1] for p in (json.loads(line)["prompt"] for line in f) if "," in p]
        references = [ci.ci_reference(e) for e in examples]
        ys = [f"{y_o},{styles[n % len(styles)]}" for n, (_, _, y_o) in enumerate(references)]
        return f"{ip2p} + DiffusionDB style tags", references, ys
    examples, _ = load_examples(SAMPLE_PATH)
    references = [ci.ci_reference(e) for e in examples]
    return f"{SAMPLE_PATH} (shipped sample; ../shared/data is absent)", references, [e.y for e in examples]


def timed(fn, repeats: int, clear_references: bool) -> float:
    """Median seconds of fn() over repeats."""
    seconds = []
    for _ in range(repeats):
        if clear_references:
            ci.reference.cache_clear()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="rollout batch size for prefix CI")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    description, references, ys = load_cases()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer(ys + [t for ref in references for t in ref], 8192, tmp)
    rows = [ids + [tokenizer.eos_token_id] for ids in encode(tokenizer, [response_text(y) for y in ys])]
    batches = []
    for start in range(0, len(rows), args.batch):
        chunk = rows[start:start + args.batch]
        ids = np.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id, np.int32)
        for b, row in enumerate(chunk):
            ids[b, :len(row)] = row
        batches.append((references[start:start + args.batch], ids, [len(row) for row in chunk]))

    def scores():
        for reference, y in zip(references, ys):
            ci.ci_score(*reference, y)

    def prefix_scores():
        for refs, ids, lengths in batches:
            ci.prefix_ci_batch(refs, ids, tokenizer, lengths=lengths)

    scores()  # warm-up: loads WordNet and the tagger, fills the lemma and synonym caches
    n = len(ys)
    print(f"data: {description}: {n} prompts, {np.mean([len(r) for r in rows]):.1f} response tokens on average "
          f"(max {max(map(len, rows))}); POS tagger: {get_tagger('auto').name}")
    for name, fn in (("ci_score", scores), (f"prefix CI, batches of {args.batch}", prefix_scores)):
        for clear, label in ((True, "new references"), (False, "cached references")):
            seconds = timed(fn, args.repeats, clear)
            print(f"{name:32s} {label:18s} {n / seconds:10.0f} prompts/s")


if __name__ == "__main__":
    main()
