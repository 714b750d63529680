"""Side-by-side benchmark of optimsyn-lm's LoRA SFT against transformers + PEFT, in one run.

Both sides load the same bench model folder (`benches/bench-model/`) in fp32 on the CPU with the
same thread count, attach a LoRA r 128 / alpha 512 adapter on q/k/v/o (dropout 0, PEFT's init: B =
0) and train with AdamW (lr 1e-4, betas 0.9 / 0.999, eps 1e-8, no weight decay, gradient norm
clipped to 1.0) on batches of 8 rows of 256 random token ids, every token a loss token (labels =
input ids), one forward / backward per optimizer step. Ours is the `sft` bench binary
(benches/sft.rs, `optimsyn_lm::sft::train`) in its JSON mode; the transformers side is the plain
loop in this file (`--worker`): `loss = model(input_ids=x, labels=x).loss; loss.backward();
clip_grad_norm_; opt.step(); opt.zero_grad()`. Tokens/s = 8 x 256 input tokens over a step's
time; the first step of each process is a warm-up and is not counted; the best (and the mean) of
the other steps is reported.

GFLOP/s for both sides uses the same count per token (from our binary):
`4·N_w + 6·P_lora + 3·A` (frozen base: forward 2·N_w and input gradients 2·N_w, no weight
gradients; LoRA forward 2·P and backward 4·P; attention A = 4·L·q·(S+1)/2, backward ~2x), next to
the conventional 6·N·T, which counts the frozen weights' gradients too. Both are compared with a
plain [2048, 512] x [512, 1536] matmul (the forward's MLP shape) and a 2048^3 one.

Usage (from the workspace root; it builds the bench in the bench profile first):
    eval "$(cargo xtask env)"
    $OPTIMSYN_PYTHON python/bench/sft_compare.py [--rounds 3] [--threads 2] [--steps 6] [--json OUT.json]

Parts are interleaved over --rounds rounds, alternating which side goes first; each part runs in its
own process (max RSS from wait4). The floor (issue #5): ours >= 1.1x transformers.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_compare import (build, cargo_env, common_args, cpu_model, load1, log, run,  # noqa: E402
                        print_machine, run_measured, wait_quiet, write_json)

FLOOR = 1.1


def worker(model_dir, steps, batch, seq):
    """The transformers + PEFT training loop; prints one JSON line."""
    import torch
    threads = int(os.environ.get("THREADS", "2"))
    torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = base.config.vocab_size
    model = get_peft_model(base, LoraConfig(r=128, lora_alpha=512, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    data = torch.randint(3, vocab, (steps, batch, seq))
    step_s = []
    t_all = time.perf_counter()
    loss = None
    for i in range(steps):
        t = time.perf_counter()
        x = data[i]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        step_s.append(time.perf_counter() - t)
    wall = time.perf_counter() - t_all
    counted = step_s[1:]
    tokens = batch * seq
    print(json.dumps({
        "side": "transformers", "threads": threads, "batch": batch, "seq": seq, "steps": steps,
        "lora_params": sum(p.numel() for p in params),
        "step_s": [round(x, 4) for x in step_s], "train_wall_s": round(wall, 3), "last_loss": loss,
        "best_tok_s": round(tokens / min(counted), 1),
        "mean_tok_s": round(tokens / (sum(counted) / len(counted)), 1),
        "wall_tok_s": round(tokens * steps / wall, 1),
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per process (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    common_args(ap, "sft", "transformers", load_below=1e9, max_wait=0, clean_share=0.1, omp_wait_policy="PASSIVE")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, max(2, args.steps), args.batch, args.seq)
        return


    env = cargo_env()
    exe = args.exe or build(env, "sft")
    th = str(args.threads)
    base = dict(env, THREADS=th, OMP_NUM_THREADS=th, MKL_NUM_THREADS=th, TOKENIZERS_PARALLELISM="false",
                OMP_WAIT_POLICY=args.omp_wait_policy)
    sizes = dict(STEPS=str(args.steps), BATCH=str(args.batch), SEQ=str(args.seq))
    rust_env = dict(base, OPTIMSYN_BENCH_JSON="1", **sizes)
    if args.model:
        rust_env["OPTIMSYN_BENCH_MODEL"] = args.model
    prep, _ = run([exe], dict(rust_env, WHICH="prepare"))
    model = args.model or prep["model_dir"]
    rust_env["OPTIMSYN_BENCH_MODEL"] = model
    log("bench model:", model)

    def rust(which):
        return run_measured([exe], dict(rust_env, WHICH=which))

    def python():
        return run_measured([args.python, str(Path(__file__).resolve()), "--worker", model, "--steps",
                             str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)], base)

    load_start = wait_quiet(args.load_below, args.max_wait)
    log(f"measuring at load average {load_start:.2f}")
    rounds = []
    loads = [load_start]
    for r in range(args.rounds):
        order = [("ours", lambda: rust("train")), ("transformers", python)]
        if r % 2:
            order.reverse()
        rec = {"rss": {}, "foreign_cpu": {}}
        for side, fn in order:
            j, rss, wall, foreign = fn()
            rec[side] = j
            rec["rss"][side] = round(rss, 1)
            rec["foreign_cpu"][side] = round(foreign, 3)
            log(f"round {r + 1} {side:12s} {wall:5.1f} s  max RSS {rss:7.1f} MiB  other processes "
                f"{100 * foreign:4.1f}% CPU  best {j['best_tok_s']} tok/s, mean {j['mean_tok_s']}, "
                f"steps {j['step_s']}")
        loads.append(load1())
        rounds.append(rec)
    probes, _, _, probe_foreign = rust("matmul")
    loads.append(load1())

    ours0 = rounds[0]["ours"]
    fpt, fpt_6n = ours0["flops_per_token"], ours0["flops_per_token_6n"]

    # Rounds in which other processes took under --clean-share of the CPU in both measurements are
    # "clean"; the best figures come from those when there are any, else from every round.
    clean = [rd for rd in rounds if max(rd["foreign_cpu"].values()) < args.clean_share]
    used = clean or rounds

    def best(side, key):
        return max(rd[side][key] for rd in used)

    res = {}
    for key in ("best_tok_s", "mean_tok_s", "wall_tok_s"):
        o, t = best("ours", key), best("transformers", key)
        res[key] = {"ours": o, "transformers": t, "ratio": round(o / t, 3),
                    "per_round": [round(rd["ours"][key] / rd["transformers"][key], 3) for rd in rounds]}
    ratio = res["best_tok_s"]["ratio"]
    mm, sq = probes["matmul_gflop_s"], probes["matmul_square_gflop_s"]
    gflops = {side: {"gflop_s": round(fpt * best(side, "best_tok_s") / 1e9, 1),
                     "gflop_s_6nt": round(fpt_6n * best(side, "best_tok_s") / 1e9, 1)}
              for side in ("ours", "transformers")}
    for side in gflops:
        gflops[side]["pct_of_matmul"] = round(100 * gflops[side]["gflop_s"] / mm, 1)
    report = {
        "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "threads": args.threads,
                    "omp_wait_policy": args.omp_wait_policy, "load_avg_during": [round(x, 2) for x in loads],
                    "other_processes_cpu_share_max": round(max([v for rd in rounds for v in rd["foreign_cpu"].values()]
                                                               + [probe_foreign]), 3)},
        "model_dir": model, "batch": args.batch, "seq": args.seq, "steps_per_process": args.steps,
        "params": ours0.get("params"), "lora_params": ours0.get("lora_params"),
        "tok_s": res, "floor": FLOOR, "passed": ratio >= FLOOR,
        "flops_per_token": fpt, "flops_per_token_6n": fpt_6n, "gflop_s": gflops,
        "matmul_gflop_s": {"mlp_shape": mm, "square": sq},
        "peak_rss_mib": {side: max(rd["rss"][side] for rd in rounds) for side in ("ours", "transformers")},
        "clean_rounds": [i + 1 for i, rd in enumerate(rounds) if rd in clean],
        "rounds": rounds, "probes": probes,
    }
    print_machine(report, args.threads, rounds, omp_wait_policy=args.omp_wait_policy)
    print(f"bench model: {model} ({report['params']} parameters, LoRA {report['lora_params']}); "
          f"{args.batch} x {args.seq} tokens per step, {args.steps} steps per process (first not counted)\n")
    print("| tokens/s | ours | transformers + PEFT | ratio (of bests; per round) |")
    print("|---|---:|---:|---|")
    for key, r in res.items():
        print(f"| {key} | {r['ours']:.1f} | {r['transformers']:.1f} | {r['ratio']:.2f}x; "
              f"{', '.join(f'{x:.2f}' for x in r['per_round'])} |")
    print(f"\nfloor {FLOOR}x on best_tok_s: {'PASS' if report['passed'] else 'FAIL'} ({ratio:.2f}x)")
    print(f"GFLOP/s at the best step ({fpt / 1e6:.1f} MFLOP per token = 4·N_w + 6·P_lora + 3·A; 6·N: "
          f"{fpt_6n / 1e6:.1f}): ours {gflops['ours']['gflop_s']} ({gflops['ours']['pct_of_matmul']}% of matmul; "
          f"6NT {gflops['ours']['gflop_s_6nt']}), transformers {gflops['transformers']['gflop_s']} "
          f"({gflops['transformers']['pct_of_matmul']}%; 6NT {gflops['transformers']['gflop_s_6nt']}); plain matmul "
          f"{probes['matmul_shape']} {mm}, square {probes['matmul_square_shape']} {sq}")
    print("peak RSS (MiB):", json.dumps(report["peak_rss_mib"]))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
