"""The CPU benchmark harness: generates seeded random-weight Llamas (no download), converts
them to GGUF with `llorch quantize`, runs `llorch bench` (bare engine and, with --http, the
daemon over HTTP) for every model, format and thread count, and optionally llama.cpp's
`llama-bench` on the same GGUF files. Prints a markdown table and writes JSON.

Usage:
  python3 scripts/bench.py [--presets small,1b] [--formats f16,q8_0,q4_0,q4_k_m]
                           [--threads 1,2] [--runs 5] [--http] [--launches 1]
                           [--prompt-tokens 128] [--concurrency 1,4,8] [--llama-bench PATH]
                           [--models target/bench-models] [--out bench.json]

With --http and --launches N, every configuration runs in N separate launches (each its own
engine and daemon processes, since processes of one binary differ by more than the daemon's
cost): the table's daemon columns are the medians over the launches of each launch's decode
loss and added time to first token, and the JSON keeps every launch.

Formats: f32, f16, bf16 (safetensors, kept as stored on the CPU) and f16-gguf, q8_0, q4_0,
q4_k_m (GGUF written from the f32 model). The llorch binary is target/release/llorch
(`cargo build --release` first) unless --llorch says otherwise.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFETENSORS = {"f32": "f32", "f16": "f16", "bf16": "auto"}
GGUF = {"f16-gguf": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k_m"}


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return out.stdout


def model_dir(args, preset, dtype):
    path = os.path.join(args.models, f"{preset}-{dtype}")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"writing {path}", file=sys.stderr)
        run([sys.executable, os.path.join(ROOT, "scripts", "make_llama.py"), path,
             "--preset", preset, "--dtype", dtype, "--seed", "0"])
    return path


def source(args, preset, fmt):
    """The model source and the --dtype for one format."""
    if fmt in SAFETENSORS:
        return model_dir(args, preset, fmt), SAFETENSORS[fmt]
    base = model_dir(args, preset, "f32")
    path = os.path.join(base, f"model-{GGUF[fmt]}.gguf")
    if not os.path.exists(path):
        print(f"writing {path}", file=sys.stderr)
        run([args.llorch, "quantize", base, "--type", GGUF[fmt], "--out", path])
    return path, "auto"


def llama_cpp(args, path, threads):
    """llama-bench's prefill and decode tokens/s (means over its repetitions)."""
    out = run([args.llama_bench, "-m", path, "-p", "128", "-n", "64", "-t", str(threads),
               "-r", str(args.runs), "-o", "json"])
    rows = json.loads(out)
    pick = lambda key: next((r["avg_ts"] for r in rows if r.get(key, 0) > 0 and
                             r.get("n_gen" if key == "n_prompt" else "n_prompt", 0) == 0), None)
    return {"prefill_tok_s": pick("n_prompt"), "decode_tok_s": pick("n_gen")}


def fmt_num(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def table(results):
    head = ("| model | format | threads | prefill tok/s | decode tok/s | bound tok/s | of bound "
            "| TTFT ms | HTTP decode | HTTP TTFT ms | daemon decode loss | added TTFT ms "
            "| 4 streams tok/s | 8 streams tok/s | llama.cpp prefill | llama.cpp decode |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b, h, l = r["bench"], r["bench"].get("http", {}), r.get("llama_cpp") or {}
        streams = {c["streams"]: c["tokens_per_s"] for c in h.get("concurrent", [])}
        frac = b.get("decode_fraction_of_bound")
        daemon = r.get("daemon", {})
        loss = daemon.get("decode_loss")
        lines.append("| " + " | ".join([
            r["preset"], r["format"], str(r["threads"]), fmt_num(b["prefill_tok_s"]),
            fmt_num(b["decode_tok_s"]), fmt_num(b["decode_bound_tok_s"]),
            "-" if frac is None else f"{100 * frac:.0f} %", fmt_num(b["ttft_ms"]),
            fmt_num(h.get("decode_tok_s")), fmt_num(h.get("ttft_ms")),
            "-" if loss is None else f"{100 * loss:.1f} %",
            fmt_num(daemon.get("added_ttft_ms"), 2),
            fmt_num(streams.get(4)), fmt_num(streams.get(8)),
            fmt_num(l.get("prefill_tok_s")), fmt_num(l.get("decode_tok_s")),
        ]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="small,1b")
    parser.add_argument("--formats", default="f16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--launches", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--llama-bench")
    parser.add_argument("--llorch", default=os.path.join(ROOT, "target", "release", "llorch"))
    parser.add_argument("--models", default=os.path.join(ROOT, "target", "bench-models"))
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    results = []
    for preset in args.presets.split(","):
        for fmt in args.formats.split(","):
            path, dtype = source(args, preset, fmt)
            for threads in [int(t) for t in args.threads.split(",")]:
                env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
                cmd = [args.llorch, "bench", "--source", path, "--dtype", dtype,
                       "--runs", str(args.runs), "--prompt-tokens", str(args.prompt_tokens)]
                if args.http:
                    cmd += ["--http", "--concurrency", args.concurrency]
                print(f"{preset} {fmt} {threads}T", file=sys.stderr)
                launches = [json.loads(run(cmd, env)) for _ in range(max(args.launches, 1))]
                result = {"preset": preset, "format": fmt, "threads": threads,
                          "bench": launches[0]}
                if args.http:
                    median = lambda key: statistics.median(b["http"][key] for b in launches)
                    result["daemon"] = {"launches": len(launches),
                                        "decode_loss": median("decode_loss"),
                                        "added_ttft_ms": median("added_ttft_ms")}
                    result["launches"] = launches
                if args.llama_bench and path.endswith(".gguf"):
                    result["llama_cpp"] = llama_cpp(args, path, threads)
                results.append(result)
                with open(args.out, "w") as out:
                    json.dump(results, out, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
