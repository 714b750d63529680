"""Write the bench model folder: the Qwen3 shape of `benches/bench-model/` with seeded random weights.

    python python/bench/make_bench_model.py [--shape {bench,0.5b}] OUT_DIR [SEED]

Both sides of every side-by-side benchmark load the folder this writes, so they run on identical
weights. The weights are transformers' own initialisation of `Qwen3ForCausalLM` after
`torch.manual_seed(SEED)` (default 0), written in fp32 (safetensors). The tokenizer, chat template
and generation config are copied from `benches/bench-model/` unchanged. Shapes:

- `bench` (the default): `benches/bench-model/config.json` as it is (vocab 8192, hidden 512,
  8 layers, ~29M parameters). The same draw as the bench model of the earlier measurements in
  docs/PERFORMANCE.md, so those figures stay comparable (its pad row, id 0, stays zero as
  transformers leaves it). The Rust benches call this script once with `OUT_DIR` alone and cache
  the result (`optimsyn_examples::bench_model_dir`).
- `0.5b`: the 0.5B shape of the GPU benchmarks (hidden 1024, 28 layers, intermediate 3072,
  16 attention heads, 8 KV heads, head_dim 128, vocab 32000, tied embeddings; ~0.47B parameters,
  ~1.9 GB in fp32); the other keys as in the bench config. transformers zeroes the pad token's
  embedding row at init, and through 28 layers that row makes RMSNorm's backward blow up (non-finite
  LoRA gradients), so every all-zero row of the embedding (and of lm_head if untied) is drawn again
  from the same N(0, initializer_range) with a generator seeded by SEED. The copied tokenizer knows
  only ids below 8192: ids 8192..31999 have no text, so this shape is for random-id workloads only
  (which is what the benchmarks feed it). On a GPU machine the side-by-side runners write it
  themselves (`lm_compare.py --shape 0.5b`), or by hand:

    python python/bench/make_bench_model.py --shape 0.5b ~/.cache/optimsyn/bench/qwen3-0.5b
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

SPEC = Path(__file__).resolve().parents[2] / "benches" / "bench-model"
# Keys of config.json that describe the file rather than the shape; Qwen3Config sets them itself.
NOT_SHAPE = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# Overrides of the bench config per shape.
SHAPES = {
    "bench": {},
    "0.5b": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 4096, "tie_word_embeddings": True, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6},
}


def zero_rows(w):
    return (w == 0).all(dim=1).nonzero().flatten()


def redraw_zero_rows(model, config, seed):
    """Draws every all-zero row of the input embedding (and the untied lm_head) again, from the init
    distribution, with a generator seeded by `seed`; asserts none is left."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", None) or 0.02
    mats = [("embed_tokens", model.get_input_embeddings().weight)]
    if not config.tie_word_embeddings:
        mats.append(("lm_head", model.get_output_embeddings().weight))
    with torch.no_grad():
        for name, w in mats:
            rows = zero_rows(w)
            if len(rows):
                w[rows] = torch.normal(0.0, std, (len(rows), w.shape[1]), generator=gen).to(w.dtype)
            left = zero_rows(w)
            assert len(left) == 0, f"{name}: rows {left.tolist()} are still zero"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See the module docstring for the shapes.")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("seed", metavar="SEED", type=int, nargs="?", default=0)
    args = ap.parse_args()
    out = Path(args.out_dir)
    shape = {k: v for k, v in json.loads((SPEC / "config.json").read_text()).items() if k not in NOT_SHAPE}
    shape.update(SHAPES[args.shape])
    torch.manual_seed(args.seed)
    config = Qwen3Config(**shape)
    model = Qwen3ForCausalLM(config)
    if args.shape != "bench":  # the bench shape keeps the draw of the published figures
        redraw_zero_rows(model, config, args.seed)
    model.save_pretrained(out)
    for name in COPIED:
        shutil.copyfile(SPEC / name, out / name)
    print(out)


if __name__ == "__main__":
    main()
