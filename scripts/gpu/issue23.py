"""Issue 23 (GPU decode speed) on a GPU machine: run from the repository root as
`python3 scripts/gpu/issue23.py STEP...` with STEP among suite, decode, profile (or `all`).

Expects what `scripts/gpu/pack.sh` puts in `.gpu/`. `suite` is issue 6's (every packed test
binary on cuda:0, including the fused kernels' `cuda_kernels`). `decode`: the 1.1B random Llama
in bf16 through the daemon with 1, 8, 32 and 64 concurrent streams, first with the fused
kernels and decode graphs, then with the fused kernels run eagerly (`LLORCH_CUDA_GRAPHS=off`),
then with the same binary on candle's ops (`LLORCH_CUDA_KERNELS=candle`), beside
transformers' `generate` at batch 1, 8 and 32 in the same call. `profile`: one single-stream
`llorch bench` run of each kind under `nsys` (when the machine has it): kernels launched per
generated token and GPU time per kernel name. Writes `issue23.json` and logs under $OUT.
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

KINDS = {"graphs": {}, "eager": {"LLORCH_CUDA_GRAPHS": "off"},
         "candle": {"LLORCH_CUDA_KERNELS": "candle"}}
PROFILE_DECODE = 128


def card():
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def daemon_runs(kind, counts, reps=3):
    """The daemon on the big model with `kind`'s environment, `reps` runs per stream count."""
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
    finally:
        exit_status = daemon.stop()
    return {"runs": runs, "exit": exit_status}


def decode():
    result = {"card": card(), "prompt_tokens": issue19.PROMPT, "decode_tokens": issue19.DECODE}
    result["graphs"] = daemon_runs("graphs", (1, 8, 32, 64))
    result["eager"] = daemon_runs("eager", (1, 8, 32, 64), reps=2)
    result["candle"] = daemon_runs("candle", (1, 32), reps=2)
    result["transformers"] = issue19.transformers_rates(big_model(), (1, 8, 32))
    report["decode"] = result


def profile():
    found = glob.glob("/usr/local/cuda*/bin/nsys") + glob.glob("/opt/nvidia/nsight-systems/*/bin/nsys")
    nsys = shutil.which("nsys") or next(iter(sorted(found)), None)
    result = {"card": card(), "nsys": nsys}
    if nsys is None:
        report["profile"] = result
        log("profile", "no nsys on this machine")
        return
    big = big_model()
    for kind, env in KINDS.items():
        stem = os.path.join(issue6.WORK, f"profile-{kind}")
        command = [nsys, "profile", "-t", "cuda", "--cuda-graph-trace", "node", "--force-overwrite", "true", "-o", stem,
                   issue6.BIN, "bench", "--source", big, "--device", "cuda:0", "--dtype", "bf16",
                   "--prompt-tokens", "16", "--decode-tokens", str(PROFILE_DECODE), "--runs", "1",
                   "--concurrency", "1"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, CUDA_CACHE_PATH="/tmp/jit", **env))
        with open(os.path.join(OUT, f"profile-{kind}.log"), "w") as f:
            f.write(run.stdout + run.stderr)
        stats = subprocess.run([nsys, "stats", "-r", "cuda_gpu_kern_sum", "-f", "csv",
                                stem + ".nsys-rep"], capture_output=True, text=True, timeout=300)
        with open(os.path.join(OUT, f"profile-{kind}-kernels.csv"), "w") as f:
            f.write(stats.stdout + stats.stderr)
        result[kind] = {"exit_code": run.returncode, "bench": run.stdout[-4000:]}
        log("profile", kind, run.returncode)
    report["profile"] = result


STEPS = {"suite": issue6.suite, "decode": decode, "profile": profile}


if __name__ == "__main__":
    issue19.run_steps(STEPS, "issue23.json")
