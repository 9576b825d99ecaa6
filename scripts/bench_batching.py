"""Continuous batching on the CPU, beside llama.cpp in the same run: for every model and format,
`llorch bench` with 1, 4, 8 and 16 concurrent streams on one replica (16-token prompts, 64
tokens each), the time to first token of a request arriving while 8 streams decode, and of a
repeated 1000-token prefix; llama.cpp's `llama-batched-bench` on the same GGUF file and
stream counts; and single-stream prefill / decode of this binary against a baseline binary,
alternated. Writes JSON and prints a markdown table.

Usage:
  python3 scripts/bench_batching.py --llorch target/release/llorch --base <llorch before>
      --batched-bench <llama-batched-bench> --models <dir with small-f32/, 1b-f32/>
      [--presets small,1b] [--formats q8_0,q4_0] [--threads 2] [--rounds 3] [--out batching.json]

The GGUF files are `<models>/<preset>-f32/model-<format>.gguf` as scripts/bench.py writes them.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def llorch_bench(binary, path, threads, extra):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    return json.loads(run([binary, "bench", "--source", path] + extra, env=env))


def batched_bench(binary, path, threads, streams):
    """S_TG (aggregate decode tokens/s) and S_PP per stream count, from llama-batched-bench."""
    out = run([binary, "-m", path, "-c", "4096", "-b", "2048", "-ub", "512", "-npp", "16",
               "-ntg", "64", "-npl", ",".join(map(str, streams)), "-t", str(threads), "-kvu"])
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
            rows[int(cells[2])] = {"decode_tok_s": float(cells[7]), "prefill_tok_s": float(cells[5])}
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llorch", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--batched-bench", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--presets", default="small,1b")
    parser.add_argument("--formats", default="q8_0,q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="batching.json")
    args = parser.parse_args()
    streams = [1, 4, 8, 16]
    results = []
    for preset in args.presets.split(","):
        for fmt in args.formats.split(","):
            path = os.path.join(args.models, f"{preset}-f32", f"model-{fmt}.gguf")
            print(f"{preset} {fmt}", file=sys.stderr)
            load = llorch_bench(args.llorch, path, args.threads, [
                "--prompt-tokens", "16", "--decode-tokens", "64", "--runs", "3",
                "--concurrency", ",".join(map(str, streams)), "--load-streams", "8",
                "--prefix-tokens", "1000"])
            llama = batched_bench(args.batched_bench, path, args.threads, streams)
            # Single stream, this binary and the baseline alternated.
            single = {"new": [], "base": []}
            for _ in range(args.rounds):
                for name, binary in (("new", args.llorch), ("base", args.base)):
                    r = llorch_bench(binary, path, args.threads, [
                        "--prompt-tokens", "128", "--decode-tokens", "64", "--runs", "3",
                        "--concurrency", "1"])
                    single[name].append({"prefill": r["prefill_tok_s"], "decode": r["decode_tok_s"]})
            results.append({"preset": preset, "format": fmt, "threads": args.threads,
                            "llorch": load, "llama_batched_bench": llama, "single": single})
            with open(args.out, "w") as out:
                json.dump(results, out, indent=1)
    print(table(results))


def table(results):
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    lines = ["| model | format | 1 | 4 | 8 | 16 | 8 ÷ 1 | 16 ÷ prefill | llama.cpp 1 / 8 / 16 "
             "| llama.cpp 8 ÷ 1, 16 ÷ 1 | TTFT idle / under 8 streams ms | 1000-token prefix "
             "first / repeat ms | single prefill, decode: new / base |",
             "|" + "---|" * 13]
    for r in results:
        agg = {c["streams"]: c["steady_decode_tok_s"] for c in r["llorch"]["concurrent"]}
        llama = {int(k): v for k, v in r["llama_batched_bench"].items()}
        load, prefix = r["llorch"]["ttft_under_load"], r["llorch"]["prefix_cache"]
        new, base = r["single"]["new"], r["single"]["base"]
        prefill = med(new, "prefill")
        lines.append(
            f"| {r['preset']} | {r['format']} | {agg[1]:.1f} | {agg[4]:.1f} | {agg[8]:.1f} "
            f"| {agg[16]:.1f} | {agg[8] / agg[1]:.2f} | {agg[16] / prefill:.2f} "
            f"| {llama[1]['decode_tok_s']:.1f} / {llama[8]['decode_tok_s']:.1f} / "
            f"{llama[16]['decode_tok_s']:.1f} "
            f"| {llama[8]['decode_tok_s'] / llama[1]['decode_tok_s']:.2f}, "
            f"{llama[16]['decode_tok_s'] / llama[1]['decode_tok_s']:.2f} "
            f"| {load['idle_ttft_ms']:.1f} / {load['loaded_ttft_ms']:.1f} "
            f"| {prefix['first_ttft_ms']:.0f} / {prefix['repeat_ttft_ms']:.0f} "
            f"| {prefill:.1f}, {med(new, 'decode'):.1f} / {med(base, 'prefill'):.1f}, "
            f"{med(base, 'decode'):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
