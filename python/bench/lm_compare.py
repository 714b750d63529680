"""Side-by-side benchmark of optimsyn-lm against transformers, in one run, on the bench model.

Both sides load the same bench model folder (`benches/bench-model/`: `make_bench_model.py`'s
seeded random Qwen3 weights), in fp32 on the CPU with the same thread count, and run the same
workloads: per-token log-probs of 8 x 256 tokens (no grad), and greedy generation of 128 new tokens
from 32-token random prompts at batch 1 and 8. The transformers side is
`python/bench/baselines.py` (WHICH=forward / generate); ours is the criterion bench
binary of crates/lm in its JSON mode (`OPTIMSYN_BENCH_JSON=1`, the same best-of counts). Each part
runs in its own process, so its peak memory (max RSS, from wait4) is its own. The parts are
interleaved over several rounds, alternating which side goes first, and the best of each side is
compared; the per-round ratios show the spread. Our binary also measures a plain f32 matmul (GFLOP/s)
and a matrix-vector product over 128 MiB (GB/s), for the batch-1 bandwidth limit.

Usage (from the workspace root; it builds the bench in release mode first):
    eval "$(cargo xtask env)"
    $OPTIMSYN_PYTHON python/bench/lm_compare.py [--rounds 3] [--threads 2] [--json OUT.json]

It waits (up to --max-wait seconds) for the 1-minute load average to drop below --load-below before
measuring, and reports the load it measured under.
"""
import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINES = ROOT / "python" / "bench" / "baselines.py"

# The floors: ours / transformers (batch 1 also has the bandwidth alternative).
FLOORS = {"forward_tok_s": 1.0, "generate_b8_tok_s": 2.0, "generate_b1_tok_s": 1.5}
BW_FRACTION = 0.8


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cargo_env():
    """The environment for cargo and our binary: LIBTORCH and OPTIMSYN_PYTHON from `cargo xtask env`
    unless already set (changing them would make torch-sys rebuild)."""
    env = dict(os.environ)
    if "LIBTORCH" not in env:
        out = subprocess.run(["cargo", "xtask", "env"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        for line in out.stdout.splitlines():
            m = re.match(r"export (\w+)='(.*)'$", line.strip())
            if m:
                env[m.group(1)] = m.group(2)
    return env


def build(env, name="lm"):
    """Builds bench `name` (cargo bench profile) and returns the executable's path."""
    cmd = ["cargo", "bench", "-p", "optimsyn-examples", "--bench", name, "--no-run", "--message-format=json"]
    log("build:", " ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True)
    exe = None
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == name and msg.get("executable"):
            exe = msg["executable"]
    if not exe:
        sys.exit(f"cargo did not report the {name} bench executable")
    return exe


def common_args(ap, bench, reference, load_below, max_wait, clean_share, omp_wait_policy=None):
    """The options every side-by-side runner shares (with its own defaults)."""
    ap.add_argument("--model", help="bench model folder (default: the one the bench binary writes and caches)")
    ap.add_argument("--python", default=os.environ.get("OPTIMSYN_PYTHON", sys.executable),
                    help=f"interpreter for the {reference} side (default: OPTIMSYN_PYTHON, else this one)")
    ap.add_argument("--exe", help=f"a built {bench} bench binary (skips cargo)")
    if omp_wait_policy is not None:
        ap.add_argument("--omp-wait-policy", default=omp_wait_policy, help="OMP_WAIT_POLICY for both sides")
    ap.add_argument("--load-below", type=float, default=load_below)
    ap.add_argument("--max-wait", type=int, default=max_wait)
    ap.add_argument("--clean-share", type=float, default=clean_share,
                    help="a round is clean when other processes used less than this share of the CPU throughout")
    ap.add_argument("--json", help="also write every figure to this file")


def sides(exe, rust_env, python_cmd, python_env):
    """`(rust, python)`: run our bench binary / the Python baseline with WHICH=which, measured."""
    def rust(which):
        return run_measured([exe], dict(rust_env, WHICH=which))

    def python(which):
        return run_measured(python_cmd, dict(python_env, WHICH=which))
    return rust, python


def print_machine(report, threads, rounds, omp_wait_policy=None, extra=None):
    """The machine and noise lines every runner prints above its table."""
    m = report["machine"]
    omp = f", OMP_WAIT_POLICY={omp_wait_policy}" if omp_wait_policy else ""
    print(f"\nmachine: {m['cpu']}, nproc {m['nproc']}, threads {threads}{omp}, "
          f"load average before/after each round: {m['load_avg_during']} (includes this run's own threads); "
          f"other processes used at most {100 * m['other_processes_cpu_share_max']:.1f}% of the CPU during a measurement")
    if extra:
        print(extra)
    print("other processes' CPU share per round (max over its measurements): "
          + ", ".join(f"{100 * max(rd['foreign_cpu'].values()):.1f}%" for rd in rounds)
          + f"; best figures from rounds {report['clean_rounds'] or 'all (none clean)'}")


def write_json(report, path):
    """Writes the report to `path` when one was given."""
    if path:
        Path(path).write_text(json.dumps(report, indent=1) + "\n")
        log("wrote", path)


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_quiet(below, max_wait):
    start = time.time()
    l = load1()
    while l >= below and time.time() - start < max_wait:
        log(f"load average {l:.2f} >= {below}: waiting ({int(time.time() - start)} s of {max_wait})")
        time.sleep(15)
        l = load1()
    return l


def run(cmd, env):
    """Runs a helper process; returns (its last JSON line, wall seconds)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"lm_compare: {shlex.join(cmd)} failed ({p.returncode}):\n{err[-4000:]}")
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"lm_compare: no JSON from {shlex.join(cmd)}:\n{out[-2000:]}\n{err[-2000:]}")
    return json.loads(lines[-1]), wall


def cpu_busy_s():
    """CPU seconds spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd, env):
    """Runs one measurement process through fork/exec/wait4, so that its own peak RSS and CPU time
    are known; returns (its last JSON line, max RSS in MiB, wall seconds, the share of the
    machine's CPU that other processes used meanwhile)."""
    busy0 = cpu_busy_s()
    r, w = os.pipe()
    e_r, e_w = os.pipe()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.dup2(e_w, 2)
        os.close(r)
        os.close(e_r)
        try:
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    os.close(w)
    os.close(e_w)
    with os.fdopen(r) as fo, os.fdopen(e_r) as fe:
        # Drain stderr on a thread so that neither pipe can fill and block the child.
        err_chunks = []
        th = threading.Thread(target=lambda: err_chunks.append(fe.read()))
        th.start()
        out = fo.read()
        th.join()
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    foreign = max(0.0, cpu_busy_s() - busy0 - ru.ru_utime - ru.ru_stime) / (wall * (os.cpu_count() or 1))
    err = "".join(err_chunks)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"lm_compare: {shlex.join(cmd)} failed ({code}):\n{err[-4000:]}")
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"lm_compare: no JSON from {shlex.join(cmd)}:\n{out[-2000:]}\n{err[-2000:]}")
    # ru_maxrss is in KiB on Linux.
    return json.loads(lines[-1]), ru.ru_maxrss / 1024.0, wall, foreign


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    common_args(ap, "lm", "transformers", load_below=0.7, max_wait=300, clean_share=0.05)
    args = ap.parse_args()

    env = cargo_env()
    exe = args.exe or build(env)
    th = str(args.threads)
    base = dict(env, THREADS=th, OMP_NUM_THREADS=th, MKL_NUM_THREADS=th, TOKENIZERS_PARALLELISM="false")
    rust_env = dict(base, OPTIMSYN_BENCH_JSON="1")
    if args.model:
        rust_env["OPTIMSYN_BENCH_MODEL"] = args.model
    prep, _ = run([exe], dict(rust_env, WHICH="prepare"))
    model = args.model or prep["model_dir"]
    rust_env["OPTIMSYN_BENCH_MODEL"] = model
    log("bench model:", model)

    rust, python = sides(exe, rust_env, [args.python, str(BASELINES), model], base)

    load_start = wait_quiet(args.load_below, args.max_wait)
    log(f"measuring at load average {load_start:.2f}")
    rounds = []
    loads = [load_start]
    for r in range(args.rounds):
        order = [("ours", rust), ("transformers", python)]
        if r % 2:
            order.reverse()
        rec = {"ours": {}, "transformers": {}, "rss": {}, "foreign_cpu": {}}
        for part in ("forward", "generate"):
            for side, fn in order:
                j, rss, wall, foreign = fn(part)
                rec[side].update({k: v for k, v in j.items() if k.endswith("_tok_s") or k.endswith("_gflop_s")})
                rec["rss"][f"{side}_{part}"] = round(rss, 1)
                rec["foreign_cpu"][f"{side}_{part}"] = round(foreign, 3)
                log(f"round {r + 1} {side:12s} {part:8s} {wall:5.1f} s  max RSS {rss:7.1f} MiB  "
                    f"other processes {100 * foreign:4.1f}% CPU  "
                    + " ".join(f"{k}={v}" for k, v in j.items() if k.endswith("_tok_s")))
        loads.append(load1())
        rounds.append(rec)

    # Memory baselines: the process with only the model loaded.
    _, rss_rust_load, _, _ = rust("load")
    py_load = ("import os, sys, torch; torch.set_num_threads(int(os.environ['THREADS']));"
               "from transformers import AutoModelForCausalLM;"
               "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval();"
               "print('{}')")
    _, rss_py_load, _, _ = run_measured([args.python, "-c", py_load, model], base)
    # Machine references (ours; the same libtorch as transformers').
    probes, _, _, probe_foreign = rust("matmul,matvec")
    loads.append(load1())

    # Rounds in which other processes took under --clean-share of the CPU in every measurement are
    # "clean"; the best figures come from those when there are any, else from every round.
    clean = [rd for rd in rounds if max(rd["foreign_cpu"].values()) < args.clean_share]
    used = clean or rounds

    def best(side, key):
        vals = [rd[side][key] for rd in used if key in rd[side]]
        return max(vals) if vals else None

    metrics = ["forward_tok_s", "generate_b1_tok_s", "generate_b8_tok_s"]
    res = {"ours": {k: best("ours", k) for k in metrics + ["forward_gflop_s"]},
           "transformers": {k: best("transformers", k) for k in metrics + ["forward_gflop_s"]}}
    bw = probes["matvec_gb_s"] * 1e9
    wbytes = probes["weight_bytes_per_token"]
    bw_limit = bw / wbytes
    rows = []
    for k in metrics:
        ours, ref = res["ours"][k], res["transformers"][k]
        ratio = ours / ref
        per_round = [round(rd["ours"][k] / rd["transformers"][k], 2) for rd in rounds]
        floor_x = FLOORS[k]
        floor_abs = floor_x * ref
        floor_txt = f"{floor_x:g}x ({floor_abs:.0f})"
        if k == "generate_b1_tok_s":
            bw_floor = BW_FRACTION * bw_limit
            if bw_floor < floor_abs:
                floor_abs = bw_floor
                floor_txt = f"min({floor_x:g}x = {floor_x * ref:.0f}, 80% of BW limit = {bw_floor:.0f}) = {floor_abs:.0f}"
            else:
                floor_txt = f"min({floor_x:g}x = {floor_abs:.0f}, 80% of BW limit = {bw_floor:.0f}) = {floor_abs:.0f}"
        rows.append(dict(metric=k, ours=ours, transformers=ref, ratio=round(ratio, 2), per_round=per_round,
                         floor=floor_txt, floor_tok_s=round(floor_abs, 1), passed=ours >= floor_abs))
    mm = probes["matmul_gflop_s"]
    report = {
        "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "threads": args.threads,
                    "load_avg_during": [round(x, 2) for x in loads],
                    "other_processes_cpu_share_max": round(max([v for rd in rounds for v in rd["foreign_cpu"].values()]
                                                               + [probe_foreign]), 3)},
        "model_dir": model,
        "params": prep.get("params") or probes.get("params"),
        "rows": rows,
        "forward_gflop_s": {"ours": res["ours"]["forward_gflop_s"], "transformers": res["transformers"]["forward_gflop_s"],
                            "matmul": mm, "matmul_square": probes["matmul_square_gflop_s"],
                            "ours_pct_of_matmul": round(100 * res["ours"]["forward_gflop_s"] / mm, 1),
                            "transformers_pct_of_matmul": round(100 * res["transformers"]["forward_gflop_s"] / mm, 1)},
        "bandwidth": {"matvec_gb_s": probes["matvec_gb_s"], "read_gb_s": probes.get("read_gb_s"),
                      "model_matvec_gb_s": probes["model_matvec_gb_s"], "weight_bytes_per_token": wbytes,
                      "limit_b1_tok_s": round(bw_limit, 1), "model_matvec_tok_s": probes["model_matvec_tok_s"],
                      "ours_b1_pct_of_limit": round(100 * res["ours"]["generate_b1_tok_s"] / bw_limit, 1),
                      "transformers_b1_pct_of_limit": round(100 * res["transformers"]["generate_b1_tok_s"] / bw_limit, 1)},
        "peak_rss_mib": {k: max(rd["rss"][k] for rd in rounds) for k in rounds[0]["rss"]}
        | {"ours_load_only": round(rss_rust_load, 1), "transformers_load_only": round(rss_py_load, 1)},
        "clean_rounds": [i + 1 for i, rd in enumerate(rounds) if rd in clean],
        "rounds": rounds,
        "probes": probes,
    }

    print_machine(report, args.threads, rounds, extra=f"bench model: {model} ({report['params']} parameters)")
    print()
    print("| metric | ours | transformers | ratio (of bests; per round) | floor | pass |")
    print("|---|---:|---:|---|---|---|")
    for r in rows:
        print(f"| {r['metric']} | {r['ours']:.1f} | {r['transformers']:.1f} | {r['ratio']:.2f}x; "
              f"{', '.join(f'{x:.2f}' for x in r['per_round'])} | {r['floor']} | {'PASS' if r['passed'] else 'FAIL'} |")
    g = report["forward_gflop_s"]
    print(f"\nforward GFLOP/s (2 x params x tokens): ours {g['ours']} ({g['ours_pct_of_matmul']}% of matmul), "
          f"transformers {g['transformers']} ({g['transformers_pct_of_matmul']}%); plain matmul "
          f"{probes['matmul_shape']} {mm}, square {probes['matmul_square_shape']} {g['matmul_square']}")
    b = report["bandwidth"]
    print(f"batch-1 bandwidth: {wbytes / 1e6:.1f} MB of weights per token; matvec {probes['matvec_shape']} "
          f"{b['matvec_gb_s']} GB/s (streaming read {b['read_gb_s']} GB/s) -> limit {b['limit_b1_tok_s']} tok/s; "
          f"ours {b['ours_b1_pct_of_limit']}%, transformers {b['transformers_b1_pct_of_limit']}%; "
          f"the model's own matvecs alone: {b['model_matvec_gb_s']} GB/s = {b['model_matvec_tok_s']} tok/s")
    print("peak RSS (MiB):", json.dumps(report["peak_rss_mib"]))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
