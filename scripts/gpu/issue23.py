"""Issue 23 (GPU decode speed) on a GPU machine: run from the repository root as
`python3 scripts/gpu/issue23.py STEP...` with STEP among suite, decode, quick, sampled, profile
(or `all`).

Expects what `scripts/gpu/pack.sh` puts in `.gpu/`. `suite`: every packed test binary on cuda:0
(including the fused kernels' `cuda_kernels`), each under a time limit, a hung one's threads
backtraced with cuda-gdb. `decode`: the 1.1B random Llama
in bf16 through the daemon with 1, 2, 4, 8, 32 and 64 concurrent streams, first with the fused
kernels and decode graphs, then with cuBLAS instead of the matrix-vector kernels
(`LLORCH_CUDA_GEMV=off`), then with the fused kernels run eagerly (`LLORCH_CUDA_GRAPHS=off`),
then with the same binary on candle's ops (`LLORCH_CUDA_KERNELS=candle`), beside
transformers' `generate` at batch 1, 8 and 32 in the same call. `profile`: single-stream
`llorch bench` runs of two kinds under Nsight Compute: kernels per decode token and GPU time
per kernel name (matrix products also per launch shape). Writes `issue23.json` and logs under $OUT.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import issue6  # noqa: E402
import issue19  # noqa: E402
from issue6 import OUT, Daemon, big_model, log, report  # noqa: E402

KINDS = {"graphs": {}, "nogemv": {"LLORCH_CUDA_GEMV": "off"},
         "eager": {"LLORCH_CUDA_GRAPHS": "off"}, "candle": {"LLORCH_CUDA_KERNELS": "candle"}}
PROFILE_SHORT = 2
PROFILE_LONG = 6
# Decode steps between the two profiled runs: the warm-up (min(tokens, 4)), the measured run and
# the one-stream run each decode their tokens.
DECODE_STEPS = 2 * (PROFILE_LONG - PROFILE_SHORT) + min(PROFILE_LONG, 4) - min(PROFILE_SHORT, 4)


def card():
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


SAMPLED = {"temperature": 0.8, "min_p": 0.05, "seed": 7}
SAMPLED_TOP_K = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7}
SAMPLED_TOP_P = {"temperature": 0.8, "top_p": 0.9, "seed": 7}


def daemon_runs(kind, counts, reps=3, sampled=()):
    """The daemon on the big model with `kind`'s environment, `reps` greedy runs per stream
    count, then two runs per count in `sampled` with each of SAMPLED's, SAMPLED_TOP_K's and
    SAMPLED_TOP_P's settings (all drawn on the device)."""
    big = big_model()
    saved = dict(os.environ)
    os.environ.update(KINDS[kind])
    try:
        daemon = Daemon(f"decode-{kind}", f'version = 1\n[[models]]\nname = "big"\n'
                                          f'source = "{big}"\ndevices = ["cuda:0"]\n'
                                          'max_concurrent = 64\nqueue_timeout = "1h"\n'
                                          'request_timeout = "1h"\n')
    finally:
        os.environ.clear()
        os.environ.update(saved)
    runs = []
    try:
        issue19.concurrent(4, 0)
        for streams in counts:
            for r in range(reps):
                runs.append(issue19.concurrent(streams, 1000 * streams + 10 * r))
                log("decode", kind, json.dumps(runs[-1]))
        for streams in sampled:
            for settings in (SAMPLED, SAMPLED_TOP_K, SAMPLED_TOP_P):
                for r in range(2):
                    run = issue19.concurrent(streams, 1000 * streams + 10 * r + 5, settings)
                    runs.append(dict(run, sampling=settings))
                    log("decode", kind, "sampled", json.dumps(runs[-1]))
    finally:
        exit_status = daemon.stop()
    return {"runs": runs, "exit": exit_status}


def decode():
    result = {"card": card(), "prompt_tokens": issue19.PROMPT, "decode_tokens": issue19.DECODE}
    graphs_test = report.get("suite", {}).get("graphs", {})
    if graphs_test.get("hung_after_s") is None and graphs_test.get("exit_code", 0) == 0:
        result["graphs"] = daemon_runs("graphs", (1, 2, 4, 8, 32, 64), sampled=(1, 32))
        result["nogemv"] = daemon_runs("nogemv", (1, 2, 4, 8, 32, 64), reps=2)
    else:
        result["graphs"] = "skipped: the graph test failed or hung in this call"
    result["eager"] = daemon_runs("eager", (1, 8, 32), reps=2, sampled=(1,))
    result["candle"] = daemon_runs("candle", (1, 32), reps=2)
    result["transformers"] = issue19.transformers_rates(big_model(), (1, 8, 32))
    report["decode"] = result


def sampled():
    """Decode with the graphs, one stream greedy, then one and 32 streams with each sampled
    setting: a short check of a sampling change."""
    report["sampled"] = {"card": card(), "graphs": daemon_runs("graphs", (1,), reps=2, sampled=(1, 32))}


def cuda_tool(name):
    """A CUDA tool's path on this machine, or None."""
    found = sorted(glob.glob(f"/usr/local/cuda*/bin/{name}") + glob.glob(f"/opt/nvidia/*/{name}"))
    return shutil.which(name) or next(iter(found), None)


def run_test(name, binary, args, env, timeout):
    """One test binary (one test thread) with a time limit; when it runs out, every thread's
    backtrace (cuda-gdb attached to the process) goes to $OUT/hang-NAME.txt before the kill."""
    proc = subprocess.Popen([binary, "--test-threads", "1", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        gdb = cuda_tool("cuda-gdb")
        stacks = "no cuda-gdb"
        if gdb:
            probe = subprocess.run([gdb, "-p", str(proc.pid), "-batch", "-ex", "thread apply all bt 30"],
                                   capture_output=True, text=True, timeout=120)
            stacks = probe.stdout + probe.stderr
        with open(os.path.join(OUT, f"hang-{name}.txt"), "w") as f:
            f.write(stacks[-200000:])
        proc.kill()
        out, _ = proc.communicate()
    with open(os.path.join(OUT, f"suite-{name}.log"), "w") as f:
        f.write(out)
    result = {"exit_code": proc.returncode, "hung_after_s": timeout if hung else None,
              "results": [l for l in out.splitlines() if l.startswith("test ")],
              "summary": [l for l in out.splitlines() if l.startswith("test result")]}
    log("suite", name, result["summary"], "HUNG" if hung else "")
    return result


def suite():
    """Every packed test binary on cuda:0 in f32 (those named in $SUITES, comma-separated, when
    set), each with its own time limit; the graph test first, alone, so that a hang in it costs
    two minutes and not the step."""
    env = dict(os.environ, LLORCH_TEST_DEVICE="cuda:0", LLORCH_TEST_DTYPE="f32",
               LLORCH_FIXTURES=issue6.FIX, LLORCH_REQUIRE_FIXTURES="1", CUDA_CACHE_PATH="/tmp/jit")
    result = {}
    limits = {"cuda_kernels": 90, "candle_llama": 300, "daemon": 420, "admin": 300}
    only = os.environ.get("SUITES")
    for packed in sorted(os.listdir(os.path.join(issue6.GPU, "tests"))):
        name = packed[:-3]
        if only and name not in only.split(","):
            continue
        binary = issue6.unpack(os.path.join(issue6.GPU, "tests", packed),
                               os.path.join(issue6.WORK, name))
        args = ["--skip", "a_broken_pool_file_fails_startup"]
        if name == "candle_llama":
            graphs = run_test("graphs", binary, ["decode_graphs"], env, 120)
            result["graphs"] = graphs
            args += ["--skip", "decode_graphs"]
        result[name] = run_test(name, binary, args, env, limits.get(name, 420))
    report["suite"] = result


def kernel_table(csv_text, shapes=False):
    """ncu's CSV (one row per kernel launch and metric) as launches and GPU microseconds per
    kernel name (with `shapes`, per name and grid of the matrix products alone)."""
    import csv
    import io

    rows = [r for r in csv.reader(io.StringIO(csv_text)) if len(r) > 5]
    if not rows:
        return {}
    header = rows[0]
    name_at, value_at = header.index("Kernel Name"), header.index("Metric Value")
    unit_at, grid_at = header.index("Metric Unit"), header.index("Grid Size")
    table = {}
    for row in rows[1:]:
        name = row[name_at].split("(")[0][:80]
        if shapes:
            if not any(word in name for word in ("gemv", "nvjet", "gemm", "splitK")):
                continue
            name = f"{name} {row[grid_at]}"
        value = float(row[value_at].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                 "s": 1e6, "second": 1e6}[row[unit_at]]
        entry = table.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += value * scale
    return {k: {"launches": n, "us": round(t, 1)} for k, (n, t) in sorted(table.items())}


def quick():
    """Decode of the kinds in $QUICK_KINDS (graphs, with and without the matrix-vector kernels,
    unless set) at the stream counts of $QUICK_STREAMS (1, 8 and 64 unless set), two runs each:
    a short check of a kernel change."""
    counts = [int(c) for c in os.environ.get("QUICK_STREAMS", "1,8,64").split(",")]
    kinds = os.environ.get("QUICK_KINDS", "graphs,nogemv").split(",")
    report["quick"] = {"card": card(), **{kind: daemon_runs(kind, counts, reps=2) for kind in kinds}}


def per_decode_token(short, long):
    """What the longer profiled run launched beyond the shorter one, per decode step."""
    per_token = {}
    for name, entry in long.items():
        before = short.get(name, {"launches": 0, "us": 0.0})
        launches = (entry["launches"] - before["launches"]) / DECODE_STEPS
        if launches > 0:
            per_token[name] = {"launches": round(launches, 2),
                               "us": round((entry["us"] - before["us"]) / DECODE_STEPS, 2)}
    return per_token


def profile():
    """Kernels per decode token and GPU time per kernel (ncu, which times each kernel alone;
    nsys makes no report on these machines): one `llorch bench` stream of PROFILE_SHORT and
    one of PROFILE_LONG decode tokens per kind (a warm-up of at most four tokens, a measured run
    and a one-stream run each): the difference is DECODE_STEPS decode steps."""
    ncu = cuda_tool("ncu")
    result = {"card": card(), "ncu": ncu, "decode_steps": DECODE_STEPS}
    if ncu is None:
        report["profile"] = result
        return
    big = big_model()
    for kind in os.environ.get("PROFILE_KINDS", "graphs,nogemv").split(","):
        tables = []
        for tokens in (PROFILE_SHORT, PROFILE_LONG):
            command = [ncu, "--csv", "--metrics", "gpu__time_duration.sum", "--clock-control", "none",
                       issue6.BIN, "bench", "--source", big, "--device", "cuda:0", "--dtype", "bf16",
                       "--prompt-tokens", "16", "--decode-tokens", str(tokens), "--runs", "1",
                       "--concurrency", "1"]
            run = subprocess.run(command, capture_output=True, text=True, timeout=400,
                                 env=dict(os.environ, CUDA_CACHE_PATH="/tmp/jit", **KINDS[kind]))
            if run.returncode != 0:
                with open(os.path.join(OUT, f"profile-{kind}-{tokens}.log"), "w") as f:
                    f.write(run.stderr[-20000:])
            csv_start = run.stdout.find('"ID"')
            with open(os.path.join(OUT, f"profile-{kind}-{tokens}.csv"), "w") as f:
                f.write(run.stdout[csv_start:] if csv_start >= 0 else run.stdout[-20000:])
            text = run.stdout[csv_start:] if csv_start >= 0 else ""
            tables.append((kernel_table(text), kernel_table(text, shapes=True)))
        (short, short_shapes), (long, long_shapes) = tables
        per_token = per_decode_token(short, long)
        result[kind] = {"per_decode_token": per_token,
                        "products_per_decode_token": per_decode_token(short_shapes, long_shapes),
                        "launches_per_token": round(sum(v["launches"] for v in per_token.values()), 1),
                        "gpu_us_per_token": round(sum(v["us"] for v in per_token.values()), 1)}
        log("profile", kind, result[kind]["launches_per_token"], result[kind]["gpu_us_per_token"])
    report["profile"] = result


STEPS = {"suite": suite, "decode": decode, "quick": quick, "sampled": sampled, "profile": profile}


if __name__ == "__main__":
    issue19.run_steps(STEPS, "issue23.json")
