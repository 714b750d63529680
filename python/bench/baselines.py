"""The reference Python stacks' side of the side-by-side benchmarks, on the bench model.

    THREADS=2 WHICH=forward,generate,less,vmap python python/bench/baselines.py MODEL_DIR

MODEL_DIR is the folder `make_bench_model.py` wrote; our benches load the same one. Prints one JSON
object (and, after the LESS loop, a partial one on stderr so a long run shows progress). Parts:

- forward:  transformers log-probs of 8 x 256 random tokens, no grad -> tokens/s and GFLOP/s
            (2 FLOPs per parameter per token).
- generate: greedy `generate`, 32-token random prompts, exactly 128 new tokens (NEW_TOKENS), at
            batch 1 and 8 (BATCHES, e.g. 32) -> new tokens/s per batch size.
- less:     a LESS-style influence loop: PEFT LoRA r 128, alpha 512 on q/k/v/o (B drawn N(0, 0.01)
            so gradients reach A), one backward per 128-token candidate (labels = input ids), Adam
            preconditioning m/sqrt(v + eps) with one optimizer update folded in, then a dense
            Rademacher projection to k = 8192 generated blockwise from a seeded generator per call
            (never stored whole) -> candidates/s; and the same loop without the projection.
- vmap:     `torch.func.vmap(grad(...))` per-sample gradients of the same LoRA parameters for the
            8 candidates at once, then the same preconditioning and projection -> candidates/s.

Timings are the best of 3 (forward), 2 (generate, less without projection) or 1 (less, vmap) runs
(REPS=N sets them all) after one warm-up call, as the Rust benches' JSON mode does. These are the
settings of the earlier figures in docs/PERFORMANCE.md.

Device and precision, for every part: `DEVICE` = cpu (default) | cuda | cuda:N and `DTYPE` = f32
(default) | bf16 | f16, as the Rust bench binaries read them. The model is loaded in DTYPE and moved
to DEVICE, the random inputs (drawn on the CPU, so the draws do not depend on the device) are moved
there, and on CUDA every timed call ends with `torch.cuda.synchronize()`; the LESS projection's
sign blocks are generated on the device, as LESS does on GPUs (on the CPU the draw is unchanged).
The JSON gains `device`, `dtype` and, on CUDA, `gpu` and `cuda_peak_mib` (peak allocated). If CUDA
is asked for and torch has none, it prints `{"side": "transformers", "skipped": ...}` and exits 0.
On a GPU machine, e.g.:

    DEVICE=cuda DTYPE=bf16 BATCHES=32 WHICH=forward,generate python python/bench/baselines.py MODEL_DIR
"""
import json
import os
import sys
import time

import torch

PROJ_DIM = 8192
BLOCK_ROWS = 65536
N_CANDIDATES = 8
CANDIDATE_LEN = 128
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# Where every part runs (set by `main` from DEVICE / DTYPE).
DEVICE = torch.device("cpu")
DTYPE = torch.float32
REPS = None


def sync():
    """Waits for the device's queued work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def best_of(fn, reps):
    reps = REPS or reps
    times = []
    sync()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_part(model, vocab, nparams):
    ids = torch.randint(0, vocab, (8, 256)).to(DEVICE)

    def run():
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])

    run()
    secs = best_of(run, 3)
    tokens = ids.numel()
    return {"forward_tok_s": round(tokens / secs, 1), "forward_gflop_s": round(2 * nparams * tokens / secs / 1e9, 1)}


def generate_part(model, vocab, batches, new_tokens):
    out = {}
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, 32)).to(DEVICE)

        def run():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

        run()
        out[f"generate_b{batch}_tok_s"] = round(batch * new_tokens / best_of(run, 2), 1)
    return out


def peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE)
    config = LoraConfig(r=128, lora_alpha=512, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0.0, 0.01)
    return model.eval()


def project(rows):
    """rows [n, P] times a P x k Rademacher matrix made block by block from a fixed seed (on the
    rows' device)."""
    gen = torch.Generator(device=rows.device).manual_seed(0)
    acc = torch.zeros(rows.shape[0], PROJ_DIM, device=rows.device)
    for start in range(0, rows.shape[1], BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, rows.shape[1])
        signs = torch.randint(0, 2, (end - start, PROJ_DIM), generator=gen, dtype=torch.int8,
                              device=rows.device).float().mul_(2).sub_(1)
        acc += rows[:, start:end] @ signs
    return acc


def influence_parts(model_dir, vocab, which):
    model = peft_model(model_dir)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in params.values())
    out = {"lora_params": total}
    exp_avg, exp_avg_sq = (torch.rand(total) * 1e-4).to(DEVICE), (torch.rand(total) * 1e-8).to(DEVICE)

    def precondition(g):
        m = 0.9 * exp_avg + 0.1 * g
        v = 0.999 * exp_avg_sq + 0.001 * g * g
        return m / torch.sqrt(v + 1e-8)

    samples = torch.randint(3, vocab, (N_CANDIDATES, CANDIDATE_LEN)).to(DEVICE)

    def flat_grad(i):
        model.zero_grad()
        x = samples[i:i + 1]
        model(input_ids=x, labels=x).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params.values()])

    if "less" in which:
        def loop():
            project(torch.stack([precondition(flat_grad(i)) for i in range(N_CANDIDATES)]))

        out["less_cand_s"] = round(N_CANDIDATES / best_of(loop, 1), 3)
        print(json.dumps(out), file=sys.stderr, flush=True)

        def loop_no_projection():
            for i in range(N_CANDIDATES):
                precondition(flat_grad(i))

        out["less_noproj_cand_s"] = round(N_CANDIDATES / best_of(loop_no_projection, 2), 2)
    if "vmap" in which:
        out.update(vmap_part(model, params, samples, precondition))
    return out


def vmap_part(model, params, samples, precondition):
    from torch.func import functional_call, grad, vmap

    names = list(params)
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(values, x):
        weights = dict(zip(names, values))
        weights.update(frozen)
        logits = functional_call(model, weights, (x[None],)).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, x[1:])

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    values = tuple(p.detach() for p in params.values())
    n = samples.shape[0]

    def run():
        grads = per_sample(values, samples)
        flat = torch.cat([g.reshape(n, -1) for g in grads], 1)
        project(torch.stack([precondition(flat[i]) for i in range(n)]))

    try:
        run()
        return {"vmap_cand_s": round(n / best_of(run, 1), 3)}
    except Exception as e:  # vmap support varies by version; report, do not fail the other parts
        return {"vmap_error": str(e)[:200]}


def placement():
    """(device, dtype) from DEVICE / DTYPE; prints the skip object and exits 0 when CUDA is asked
    for and there is none."""
    global DEVICE, DTYPE
    device, dtype = os.environ.get("DEVICE", "cpu"), os.environ.get("DTYPE", "f32")
    if dtype not in DTYPES:
        sys.exit(f"DTYPE={dtype}: expected one of {', '.join(DTYPES)}")
    try:
        DEVICE = torch.device(device)
    except RuntimeError as e:
        sys.exit(f"DEVICE={device}: {e}")
    if DEVICE.type not in ("cpu", "cuda"):
        sys.exit(f"DEVICE={device}: expected cpu, cuda or cuda:N")
    skipped = None
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        skipped = "no CUDA device (torch.cuda.is_available() is False)"
    elif DEVICE.type == "cuda" and (DEVICE.index or 0) >= torch.cuda.device_count():
        skipped = f"no CUDA device {DEVICE.index} (torch.cuda.device_count() is {torch.cuda.device_count()})"
    if skipped:
        print(f"baselines: skipped: {skipped}", file=sys.stderr)
        print(json.dumps({"side": "transformers", "skipped": skipped}), flush=True)
        sys.exit(0)
    DTYPE = DTYPES[dtype]
    return device, dtype


def main(argv):
    global REPS
    if len(argv) != 2:
        sys.exit(__doc__)
    device, dtype = placement()
    threads = int(os.environ.get("THREADS", "2"))
    which = set(os.environ.get("WHICH", "forward,generate,less,vmap").split(","))
    batches = [int(b) for b in os.environ.get("BATCHES", "1,8").split(",")]
    new_tokens = int(os.environ.get("NEW_TOKENS", "128"))
    REPS = int(os.environ["REPS"]) if os.environ.get("REPS") else None
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(argv[1], dtype=DTYPE).to(DEVICE).eval()
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    nparams = sum(p.numel() for p in model.parameters())
    out = {"threads": threads, "params": nparams, "device": device, "dtype": dtype}
    if DEVICE.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(DEVICE)
    if "forward" in which:
        out.update(forward_part(model, vocab, nparams))
    if "generate" in which:
        out.update(generate_part(model, vocab, batches, new_tokens))
    if which & {"less", "vmap"}:
        out.update(influence_parts(argv[1], vocab, which))
    if DEVICE.type == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(DEVICE) / 2**20, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv)
