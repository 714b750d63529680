"""Write the bench model folder: the Qwen3 shape of `benches/bench-model/` with seeded random weights.

    python python/bench/make_bench_model.py OUT_DIR [SEED]

Both sides of every side-by-side benchmark load the folder this writes, so they run on identical
weights. The weights are transformers' own initialisation of `Qwen3ForCausalLM` after
`torch.manual_seed(SEED)` (default 0): the same draw as the bench model of the earlier
measurements in docs/PERFORMANCE.md, so those figures stay comparable. The tokenizer, chat template
and generation config are copied from `benches/bench-model/` unchanged. The Rust benches call this
script once and cache the result (`optimsyn_examples::bench_model_dir`).
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

SPEC = Path(__file__).resolve().parents[2] / "benches" / "bench-model"
# Keys of config.json that describe the file rather than the shape; Qwen3Config sets them itself.
NOT_SHAPE = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    out = Path(argv[1])
    seed = int(argv[2]) if len(argv) == 3 else 0
    shape = {k: v for k, v in json.loads((SPEC / "config.json").read_text()).items() if k not in NOT_SHAPE}
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**shape)).save_pretrained(out)
    for name in COPIED:
        shutil.copyfile(SPEC / name, out / name)
    print(out)


if __name__ == "__main__":
    main(sys.argv)
