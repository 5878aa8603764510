"""Model shapes for the benchmarks: `LAYERSxWIDTH[xHEADS]` strings (heads default to WIDTH / 64)."""
import torch
import transformers


def bloom_shape(shape: str) -> dict[str, int]:
    """"4x512" -> {"n_layer": 4, "hidden_size": 512, "n_head": 8}; "24x1536x16" sets the heads (bloom-1b1)."""
    n_layer, width, *heads = (int(v) for v in shape.split("x"))
    return {"n_layer": n_layer, "hidden_size": width, "n_head": heads[0] if heads else max(width // 64, 1)}


def random_torch_bloom(shape: str, vocab: int) -> transformers.BloomForCausalLM:
    """A transformers BLOOM of `shape` with its own random init (seed 0): the anchor's weights, which our side
    loads from its save_pretrained folder."""
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=vocab, **bloom_shape(shape)))
