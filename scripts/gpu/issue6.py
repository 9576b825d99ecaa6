"""Issue 6 checks on a GPU machine (no Rust there): run from the repository root as
`python3 scripts/gpu/issue6.py STEP...` with STEP among conformance, suite, startup, memory,
oom, multi, bench (or `all`).

Expects what `scripts/gpu/pack.sh` puts in `.gpu/`: the CUDA build `llorch.xz`, the CUDA test
binaries `tests/*.xz`, and `fixtures/` (the reference models with their goldens). Writes
`issue6.json` and one log per step under $OUT.
"""

import json
import lzma
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.getcwd()
GPU = os.path.join(ROOT, ".gpu")
FIX = os.path.join(GPU, "fixtures")
OUT = os.environ.get("OUT", "/tmp/issue6")
WORK = "/tmp/llorch-gpu"
BIN = os.path.join(WORK, "llorch")
PORT = 18080
URL = f"http://127.0.0.1:{PORT}"
report = {}


def log(*parts):
    print(*parts, flush=True)


def unpack(src, dst):
    if not os.path.exists(dst):
        with lzma.open(src) as packed, open(dst, "wb") as out:
            shutil.copyfileobj(packed, out)
        os.chmod(dst, 0o755)
    return dst


def http(method, path, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        text, status = err.read(), err.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


def complete(model, prompt, max_tokens, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    body.update(extra)
    return http("POST", "/v1/completions", body)


def gpu_used_mib():
    """Memory used on each GPU (MiB), from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def process_mib(pid):
    """GPU memory (MiB) nvidia-smi lists for `pid`, or None when it lists no such process
    (in a container it may show other pid numbers)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    mine = [int(used) for p, used in rows if int(p) == pid]
    return sum(mine) if mine else None


class Daemon:
    """`llorch serve` on PORT with a pool file written to WORK; stderr goes to $OUT/NAME.log."""

    def __init__(self, name, pool):
        os.makedirs(WORK, exist_ok=True)
        self.pool = os.path.join(WORK, f"{name}.toml")
        with open(self.pool, "w") as out:
            out.write(pool)
        self.log = open(os.path.join(OUT, f"{name}.log"), "w")
        env = dict(os.environ, CUDA_CACHE_PATH="/tmp/jit")
        self.process = subprocess.Popen([BIN, "serve", "--config", self.pool, "--listen",
                                         f"127.0.0.1:{PORT}"], stderr=self.log, env=env)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name}: the daemon exited with {self.process.returncode}")
            try:
                if urllib.request.urlopen(URL + "/ready", timeout=2).status == 200:
                    return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"{name}: never ready")

    def memory(self):
        return {"process_mib": process_mib(self.process.pid), "gpus_used_mib": gpu_used_mib()}

    def stop(self):
        self.process.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = "killed"
        gone = None
        started = time.time()
        while time.time() - started < 10:
            if process_mib(self.process.pid) is None:
                gone = round(time.time() - started, 2)
                break
            time.sleep(0.2)
        return {"exit_code": code, "gone_from_nvidia_smi_after_s": gone}


def big_model():
    """The random-weight 1.1B Llama (bf16), made once per machine with scripts/make_llama.py."""
    path = os.path.join(WORK, "big")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        started = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/make_llama.py"), path,
                        "--preset", "1b", "--dtype", "bf16", "--seed", "1"], check=True)
        report.setdefault("big_model", {})["made_in_s"] = round(time.time() - started, 1)
    return path


def words(n, start=10):
    return " ".join(f"w{start + i}" for i in range(n))


def decidable(case, mantissa):
    """Whether the golden's first token survives rounding to a float with `mantissa` explicit
    bits: its lead over the runner-up must exceed two units in the last place of the top logit."""
    top, second = case["last_prompt_top5"][0]["logit"], case["last_prompt_top5"][1]["logit"]
    ulp = 2.0 ** (math.floor(math.log2(abs(top))) - mantissa)
    return top - second > 2 * ulp


def transformers_greedy(model_dir, prompt_ids, dtype):
    """transformers' own greedy 32 tokens for the case on cuda:0 in `dtype` (the reference run in
    the same precision as ours), or the error it raised."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to("cuda:0").eval()
        ids = torch.tensor([prompt_ids], device="cuda:0")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                 min_new_tokens=32, do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()
    except Exception as err:  # report it beside our figure; ours does not depend on it
        return repr(err)[:300]


def conformance():
    import torch
    result = {"f32": {}, "bf16": {}, "transformers_bf16": {}}
    for name in sorted(os.listdir(os.path.join(FIX, "models"))):
        model = os.path.join(FIX, "models", name)
        golden = json.load(open(os.path.join(model, "golden.json")))
        for case in golden["cases"]:
            if case["kind"] != "plain":
                continue
            key = f"{name}/{case['name']}"
            for dtype in ("f32", "bf16"):
                out = subprocess.run([BIN, "generate", "--source", model, "--prompt", case["prompt"],
                                      "--device", "cuda:0", "--dtype", dtype, "--temperature", "0",
                                      "--ignore-eos", "--max-tokens", "32", "--json"],
                                     capture_output=True, text=True, timeout=300,
                                     env=dict(os.environ, CUDA_CACHE_PATH="/tmp/jit"))
                if out.returncode != 0:
                    result[dtype][key] = {"error": out.stderr[-500:]}
                    continue
                got = json.loads(out.stdout.strip().splitlines()[-1])
                agree = sum(1 for a, b in zip(got["generated_ids"], case["generated_ids"]) if a == b)
                result[dtype][key] = {
                    "exact": got["generated_ids"] == case["generated_ids"]
                    and got["prompt_ids"] == case["prompt_ids"],
                    "first_token_equal": got["generated_ids"][:1] == case["generated_ids"][:1],
                    "agreeing_of_32": agree,
                    "generated_ids": got["generated_ids"],
                }
            ours = result["bf16"][key]
            ours["decidable_in_bf16"] = decidable(case, 7)
            hf = transformers_greedy(model, case["prompt_ids"], torch.bfloat16)
            if isinstance(hf, str):
                result["transformers_bf16"][key] = {"error": hf}
            else:
                result["transformers_bf16"][key] = {
                    "first_token_equal": hf[:1] == case["generated_ids"][:1],
                    "agreeing_of_32": sum(1 for a, b in zip(hf, case["generated_ids"]) if a == b),
                    "agreeing_with_ours_of_32": sum(
                        1 for a, b in zip(hf, ours.get("generated_ids", [])) if a == b),
                }
    f32, bf16, hf = result["f32"], result["bf16"], result["transformers_bf16"]
    decided = [v for v in bf16.values() if v.get("decidable_in_bf16")]
    result["summary"] = {
        "cases": len(f32),
        "f32_exact": sum(1 for v in f32.values() if v.get("exact")),
        "bf16_ran": sum(1 for v in bf16.values() if "error" not in v),
        "bf16_first_token_equal": sum(1 for v in bf16.values() if v.get("first_token_equal")),
        "bf16_decidable_cases": len(decided),
        "bf16_first_token_equal_where_decidable": sum(1 for v in decided if v.get("first_token_equal")),
        "bf16_agreeing_tokens": sum(v.get("agreeing_of_32", 0) for v in bf16.values()),
        "bf16_tokens": 32 * len(bf16),
        "transformers_bf16_first_token_equal": sum(1 for v in hf.values() if v.get("first_token_equal")),
        "transformers_bf16_agreeing_tokens": sum(v.get("agreeing_of_32", 0) for v in hf.values()),
        "transformers_bf16_errors": sum(1 for v in hf.values() if "error" in v),
    }
    report["conformance"] = result
    log("conformance", json.dumps(result["summary"]))


def suite():
    """The daemon and admin integration suites, on cuda:0 in f32 (so goldens match exactly)."""
    result = {}
    env = dict(os.environ, LLORCH_TEST_DEVICE="cuda:0", LLORCH_TEST_DTYPE="f32",
               LLORCH_FIXTURES=FIX, LLORCH_REQUIRE_FIXTURES="1", CUDA_CACHE_PATH="/tmp/jit")
    for packed in sorted(os.listdir(os.path.join(GPU, "tests"))):
        name = packed[:-3]
        binary = unpack(os.path.join(GPU, "tests", packed), os.path.join(WORK, name))
        # This one starts the daemon binary at its build path, which exists only where it was built.
        out = subprocess.run([binary, "--test-threads", "1", "--skip",
                              "a_broken_pool_file_fails_startup"], capture_output=True, text=True,
                             env=env, timeout=540)
        with open(os.path.join(OUT, f"suite-{name}.log"), "w") as f:
            f.write(out.stdout + out.stderr)
        lines = [l for l in out.stdout.splitlines() if l.startswith("test ")]
        result[name] = {"exit_code": out.returncode, "results": lines,
                        "summary": [l for l in out.stdout.splitlines() if l.startswith("test result")]}
        log("suite", name, result[name]["summary"])
    report["suite"] = result


def startup():
    """A configured GPU that does not exist is a clear error at startup."""
    pool = os.path.join(WORK, "missing.toml")
    with open(pool, "w") as out:
        out.write('version = 1\n[[models]]\nname = "x"\nsource = "builtin:demo"\ndevices = ["cuda:7"]\n')
    out = subprocess.run([BIN, "serve", "--config", pool, "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    report["startup_missing_gpu"] = {"exit_code": out.returncode, "stderr": out.stderr[-600:]}
    log("startup", report["startup_missing_gpu"])


def memory():
    """20 load/evict cycles of the 1.1B model: GPU memory after each evict vs the baseline."""
    big = big_model()
    daemon = Daemon("memory", f'version = 1\n[server]\nmodels_root = "{WORK}"\n'
                              f'[[models]]\nname = "stories"\nsource = "{FIX}/models/stories260k"\n'
                              'devices = ["cuda:0"]\ndtype = "f32"\n')
    result = {"cycles": []}
    try:
        complete("stories", "Once upon a time", 8)
        time.sleep(1)
        result["baseline"] = daemon.memory()
        for cycle in range(20):
            started = time.time()
            load = http("POST", "/admin/models", {"name": "big", "source": "big", "devices": ["cuda:0"]})
            load_s = time.time() - started
            generated = complete("big", words(8), 16)
            loaded = daemon.memory()
            _, listing = http("GET", "/admin/models")
            replica = [m for m in listing["models"] if m["name"] == "big"][0]["replicas"][0]
            _, metrics = http("GET", "/metrics")
            metric = [l for l in str(metrics).splitlines()
                      if l.startswith("llorch_replica_") and "memory_bytes" in l and 'model="big"' in l]
            evict = http("POST", "/admin/models/big/evict")
            time.sleep(0.5)
            result["cycles"].append({
                "load_status": load[0], "load_s": round(load_s, 2), "generate_status": generated[0],
                "loaded": loaded, "admin_memory_bytes": replica["memory_bytes"],
                "admin_device_memory_bytes": replica["device_memory_bytes"],
                "replica_state": replica["state"], "metric": metric, "evict_status": evict[0],
                "after_evict": daemon.memory(),
            })
            log("memory cycle", cycle, result["cycles"][-1]["loaded"], result["cycles"][-1]["after_evict"])
        base = result["baseline"]["process_mib"] or result["baseline"]["gpus_used_mib"][0]
        after = [c["after_evict"]["process_mib"] or c["after_evict"]["gpus_used_mib"][0]
                 for c in result["cycles"]]
        result["summary"] = {"baseline_mib": base, "max_after_evict_mib": max(after),
                             "max_above_baseline_mib": max(after) - base,
                             "all_ok": all(c["load_status"] == 200 and c["evict_status"] == 200
                                           and c["generate_status"] == 200 for c in result["cycles"])}
    finally:
        result["exit"] = daemon.stop()
        report["memory"] = result
    log("memory", json.dumps(result.get("summary")), result["exit"])


def oom():
    """A load that does not fit and a prompt whose activations do not fit, while another process
    holds most of the GPU; then requests that fit still succeed."""
    import torch

    big = big_model()
    daemon = Daemon("oom", f'version = 1\n[server]\nmodels_root = "{WORK}"\n'
                           f'[[models]]\nname = "big"\nsource = "{big}"\ndevices = ["cuda:0"]\n')
    result = {}
    hogs = []
    try:
        result["warm"] = complete("big", words(8), 8)[0]

        def hog_leaving(mib):
            free, _ = torch.cuda.mem_get_info(0)
            size = free - mib * 2**20
            if size > 0:
                hogs.append(torch.empty(size, dtype=torch.uint8, device="cuda:0"))
            return torch.cuda.mem_get_info(0)[0] // 2**20

        result["free_mib_for_load"] = hog_leaving(1024)
        status, body = http("POST", "/admin/models", {"name": "big2", "source": "big", "devices": ["cuda:0"]})
        result["load_that_does_not_fit"] = {"status": status, "body": body}
        result["after_failed_load"] = complete("big", words(8), 8)[0]
        result["free_mib_for_prompt"] = hog_leaving(100)
        status, body = complete("big", words(1900), 4)
        result["prompt_that_does_not_fit"] = {"status": status, "body": body}
        status, body = complete("big", words(8), 16)
        result["next_request"] = {"status": status,
                                  "completion_tokens": body.get("usage", {}).get("completion_tokens")
                                  if isinstance(body, dict) else None}
        _, health = http("GET", "/health")
        result["health"] = health
    finally:
        hogs.clear()
        torch.cuda.empty_cache()
        result["exit"] = daemon.stop()
        report["oom"] = result
    log("oom", json.dumps(result)[:3000])


def multi():
    """One model with a replica on each GPU: both serve at once."""
    gpus = len(gpu_used_mib())
    if gpus < 2:
        report["multi"] = {"skipped": f"{gpus} GPU"}
        return
    big = big_model()
    before = gpu_used_mib()
    daemon = Daemon("multi", f'version = 1\n[[models]]\nname = "big"\nsource = "{big}"\n'
                             'devices = ["cuda:0", "cuda:1"]\n')
    result = {"gpus_before_mib": before, "gpus_loaded_mib": gpu_used_mib()}
    try:
        statuses, seen = [], []
        threads = [threading.Thread(target=lambda: statuses.append(complete("big", words(8), 400)[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            _, listing = http("GET", "/admin/models")
            seen.append([r["in_flight"] for r in listing["models"][0]["replicas"]])
            time.sleep(0.05)
        result["statuses"] = statuses
        result["replica_devices"] = [r["device"] for r in listing["models"][0]["replicas"]]
        result["both_busy_at_once"] = any(s == [1, 1] for s in seen)
    finally:
        result["exit"] = daemon.stop()
        report["multi"] = result
    log("multi", json.dumps(result))


def bench():
    """Decode tokens/s of the 1.1B model in bf16, single stream: the daemon over HTTP and
    transformers' generate on the same weights, same GPU; decode rate = 128 / (t(129) - t(1))."""
    import torch
    from transformers import AutoModelForCausalLM

    big = big_model()
    prompt_words = words(16)
    weight_bytes = os.path.getsize(os.path.join(big, "model.safetensors"))
    # Per token every weight is read once, except the embedding table, of which one row is.
    embed = 32000 * 2048 * 2
    read_per_token = weight_bytes - embed
    result = {"card": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip(),
              "bytes_read_per_token": read_per_token,
              "hbm_bound_tok_s": round(3.35e12 / read_per_token, 1)}

    daemon = Daemon("bench", f'version = 1\n[[models]]\nname = "big"\nsource = "{big}"\n'
                             'devices = ["cuda:0"]\n')
    try:
        def timed(n):
            started = time.perf_counter()
            status, body = complete("big", prompt_words, n)
            assert status == 200 and body["usage"]["completion_tokens"] == n, body
            return time.perf_counter() - started

        timed(129)
        runs = [(timed(1), timed(129)) for _ in range(5)]
        rates = [128 / (t129 - t1) for t1, t129 in runs]
        result["daemon"] = {"tok_s_median": round(statistics.median(rates), 1),
                            "tok_s_runs": [round(r, 1) for r in rates],
                            "ttft_ms_median": round(1000 * statistics.median(t1 for t1, _ in runs), 1)}
    finally:
        result["daemon_exit"] = daemon.stop()

    model = AutoModelForCausalLM.from_pretrained(big, torch_dtype=torch.bfloat16).to("cuda:0").eval()
    ids = torch.tensor([[10 + i for i in range(16)]], device="cuda:0")

    def hf_timed(n):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - started

    hf_timed(129)
    runs = [(hf_timed(1), hf_timed(129)) for _ in range(5)]
    rates = [128 / (t129 - t1) for t1, t129 in runs]
    result["transformers"] = {"tok_s_median": round(statistics.median(rates), 1),
                              "tok_s_runs": [round(r, 1) for r in rates],
                              "ttft_ms_median": round(1000 * statistics.median(t1 for t1, _ in runs), 1),
                              "torch": torch.__version__,
                              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    result["ratio_daemon_over_transformers"] = round(
        result["daemon"]["tok_s_median"] / result["transformers"]["tok_s_median"], 2)
    result["daemon_fraction_of_hbm_bound"] = round(
        result["daemon"]["tok_s_median"] / result["hbm_bound_tok_s"], 3)
    report["bench"] = result
    log("bench", json.dumps(result))


STEPS = {"conformance": conformance, "suite": suite, "startup": startup, "memory": memory,
         "oom": oom, "multi": multi, "bench": bench}


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    unpack(os.path.join(GPU, "llorch.xz"), BIN)
    steps = list(STEPS) if sys.argv[1:] == ["all"] else sys.argv[1:]
    for step in steps:
        started = time.time()
        try:
            STEPS[step]()
        except Exception as err:  # keep going: one failed step must not hide the others
            report.setdefault("errors", {})[step] = repr(err)
            log("step failed", step, repr(err))
        report.setdefault("step_seconds", {})[step] = round(time.time() - started, 1)
        with open(os.path.join(OUT, "issue6.json"), "w") as out:
            json.dump(report, out, indent=1)
    if os.path.isdir("/tmp/jit"):
        subprocess.run(["tar", "czf", os.path.join(OUT, "jit.tgz"), "-C", "/tmp", "jit"])


if __name__ == "__main__":
    main()
