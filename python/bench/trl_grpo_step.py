"""Seconds per GRPO step of TRL's GRPOTrainer on the bench model: the Python side of
`benches/grpo_step.rs`.

    THREADS=2 python python/bench/trl_grpo_step.py MODEL_DIR

MODEL_DIR is the folder `make_bench_model.py` wrote. The workload (the settings of the earlier
figures in docs/PERFORMANCE.md): CPU fp32, full fine-tuning, 4 prompts x G 4 = 16 completions of
exactly 64 new tokens per step (the random model never stops early), one optimizer step per
rollout batch, beta 0.001, lr 1e-6, temperature 1, seed 0; prompts are one-line chat instructions
of about 25 tokens; the reward is a cheap function of the completion's length. Four steps run; the
first is warm-up and the best of the rest is reported. Prints one JSON object.
"""
import json
import os
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    model_dir = argv[1]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    prompts = [f"Write a question about document {i} on the history of trade routes and their taxes." for i in range(64)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, num_generations=4,
                        max_completion_length=64, beta=0.001, learning_rate=1e-6, max_steps=4, temperature=1.0,
                        seed=0, logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True,
                        dataloader_num_workers=0)
    timer = StepTimes()
    trainer = GRPOTrainer(model=model_dir, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          reward_funcs=length_reward, args=config, train_dataset=data, callbacks=[timer])
    trainer.train()
    steady = timer.times[1:] or timer.times
    print(json.dumps({"trl_grpo_step_s": round(min(steady), 2), "steps": [round(t, 2) for t in timer.times],
                      "completions_per_step": 16, "new_tokens": 64}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
