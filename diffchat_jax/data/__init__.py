"""InstructPE / InstructPix2Pix data: loading and validation (examples), the template T, tokenisation and batching
(tokenize), tokenizers (tokenizer)."""
import os

# A small InstructPE-format sample written by us (see sample/), shipped with the package.
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "instructpe_sample.jsonl")
