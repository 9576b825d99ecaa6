"""Issue 19 (continuous batching) on a GPU machine: run from the repository root as
`python3 scripts/gpu/issue19.py STEP...` with STEP among suite, conformance, batch (or `all`).

Expects what `scripts/gpu/pack.sh` puts in `.gpu/` (the CUDA build, the CUDA test binaries,
the fixtures). `suite` and `conformance` are issue 6's steps; `batch` is new: the 1.1B random
Llama in bf16 through the daemon with 1, 8, 32 and 64 concurrent streams, beside transformers'
`generate` at batch 1, 8 and 32 on the same card in the same call. Writes `issue19.json` and
logs under $OUT.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import issue6  # noqa: E402
from issue6 import OUT, URL, Daemon, big_model, log, report  # noqa: E402

PROMPT = 16
DECODE = 128


def stream_times(prompt, max_tokens, out, index, sampling=None):
    """One streamed completion (greedy unless `sampling` gives other fields); appends (first
    token time, last token time, tokens) to out."""
    body = json.dumps({"model": "big", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       **(sampling or {})}).encode()
    request = urllib.request.Request(URL + "/v1/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    first = last = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += 1
    out[index] = (first, last, tokens)


def concurrent(streams, start, sampling=None):
    """`streams` streams at once, each its own prompt; the aggregate decode rate while all of
    them decoded (from the last first token to the first last token) and over the whole run."""
    results = [None] * streams
    threads = [threading.Thread(target=stream_times,
                                args=(issue6.words(PROMPT, start + 100 * s), DECODE, results, s,
                                      sampling))
               for s in range(streams)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r[1] for r in results) - began
    total = sum(r[2] for r in results)
    window_start = max(r[0] for r in results)
    window_end = min(r[1] for r in results)
    steady = None
    if window_end > window_start:
        # Tokens in the window, assuming each stream's tokens evenly spread over its decode.
        inside = 0.0
        for first, last, tokens in results:
            rate = (tokens - 1) / (last - first)
            inside += rate * (window_end - window_start)
        steady = inside / (window_end - window_start)
    return {"streams": streams, "tokens": total, "wall_s": round(wall, 3),
            "tokens_per_s": round(total / wall, 1),
            "steady_decode_tok_s": None if steady is None else round(steady, 1)}


def transformers_rates(big, sizes):
    """transformers' greedy `generate` on `big` in bf16 at each batch size: decode tokens/s
    (a DECODE-token run less a one-token run), median of five after two warm-ups."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(big, torch_dtype=torch.bfloat16).to("cuda:0").eval()

    def hf_timed(batch_size, n):
        ids = torch.tensor([[10 + (i * 7 + b * 13) % 31000 for i in range(PROMPT)]
                            for b in range(batch_size)], device="cuda:0")
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == PROMPT + n
        return time.perf_counter() - started

    hf = []
    for batch_size in sizes:
        # Two full-length warm-ups: the first call of each shape is several times slower.
        hf_timed(batch_size, DECODE + 1)
        hf_timed(batch_size, DECODE + 1)
        rates = []
        for _ in range(5):
            t1, tn = hf_timed(batch_size, 1), hf_timed(batch_size, DECODE + 1)
            rates.append(batch_size * DECODE / (tn - t1))
        hf.append({"batch": batch_size, "tok_s_median": round(statistics.median(rates), 1),
                   "tok_s_runs": [round(r, 1) for r in rates]})
        log("transformers", json.dumps(hf[-1]))
    result = {"runs": hf, "torch": torch.__version__,
              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    del model
    torch.cuda.empty_cache()
    return result


def batch():
    """The daemon with 1, 8, 32, 64 streams, then transformers at batch 1, 8, 32."""
    big = big_model()
    result = {"card": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip(),
              "prompt_tokens": PROMPT, "decode_tokens": DECODE}
    daemon = Daemon("batch", f'version = 1\n[[models]]\nname = "big"\nsource = "{big}"\n'
                             'devices = ["cuda:0"]\nmax_concurrent = 64\n'
                             'queue_timeout = "1h"\nrequest_timeout = "1h"\n')
    try:
        concurrent(4, 0)
        runs = []
        for streams in (1, 8, 32, 64):
            for r in range(3):
                runs.append(concurrent(streams, 1000 * streams + 10 * r))
                log("batch", json.dumps(runs[-1]))
        result["daemon"] = runs
        status, body = issue6.http("GET", "/admin/models")
        result["admin_models"] = body
        result["daemon_memory"] = daemon.memory()
    finally:
        result["daemon_exit"] = daemon.stop()

    base = os.path.join(issue6.GPU, "llorch-base.xz")
    if os.path.exists(base):
        # The daemon before batching (the commit named in the run's README), same pool.
        current = issue6.BIN
        issue6.BIN = issue6.unpack(base, os.path.join(issue6.WORK, "llorch-base"))
        daemon = Daemon("batch-base", f'version = 1\n[[models]]\nname = "big"\nsource = "{big}"\n'
                                      'devices = ["cuda:0"]\nmax_concurrent = 64\n'
                                      'queue_timeout = "1h"\nrequest_timeout = "1h"\n')
        try:
            concurrent(1, 0)
            runs = []
            for streams in (1, 8):
                for r in range(3):
                    runs.append(concurrent(streams, 1000 * streams + 10 * r))
                    log("batch", "base", json.dumps(runs[-1]))
            result["daemon_before_batching"] = runs
        finally:
            result["daemon_before_batching_exit"] = daemon.stop()
            issue6.BIN = current

    result["transformers"] = transformers_rates(big, (1, 8, 32))
    report["batch"] = result


STEPS = {"suite": issue6.suite, "conformance": issue6.conformance, "batch": batch}


def run_steps(steps, report_name):
    """Runs the named steps (`all`: every one) in order, each failure recorded and the next
    step run, and writes the report to $OUT/report_name after each."""
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(issue6.WORK, exist_ok=True)
    issue6.unpack(os.path.join(issue6.GPU, "llorch.xz"), issue6.BIN)
    names = list(steps) if sys.argv[1:] == ["all"] else sys.argv[1:]
    for step in names:
        started = time.time()
        try:
            steps[step]()
        except Exception as err:  # keep going: every step's result is worth bringing back
            report.setdefault("errors", {})[step] = repr(err)[:2000]
            log(step, "failed", repr(err))
        report.setdefault("step_seconds", {})[step] = round(time.time() - started, 1)
        with open(os.path.join(OUT, report_name), "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    run_steps(STEPS, "issue19.json")
