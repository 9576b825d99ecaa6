#!/usr/bin/env python3
"""The daemon's cost from a `llorch bench --http` report, with 95 % bootstrap intervals.

Each HTTP run follows a bare-engine run; the pairs' differences (time to first token) and
ratios (decode tokens/s) are summarised by their median and a percentile bootstrap interval of
that median (2000 resamples, seeded).

    python3 scripts/bench_pairs.py report.json
"""
import json
import random
import statistics
import sys


def interval(values, rounds=2000):
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def main():
    report = json.load(open(sys.argv[1]))
    http = report["http"]
    prompt = report["prompt_tokens"]
    bare_ttft = [prompt / rate * 1000 for rate in report["prefill_tok_s_runs"]]
    added = [h - b for h, b in zip(http["ttft_ms_runs"], bare_ttft)]
    loss = [100 * (1 - h / b) for h, b in zip(http["decode_tok_s_runs"], report["decode_tok_s_runs"])]
    print(f"{len(added)} pairs")
    print("added TTFT ms: median %.2f, 95 %% interval [%.2f, %.2f]" % (statistics.median(added), *interval(added)))
    print("decode loss %%: median %.2f, 95 %% interval [%.2f, %.2f]" % (statistics.median(loss), *interval(loss)))
    print("medians: bare TTFT %.1f ms, HTTP %.1f ms; bare decode %.1f tok/s, HTTP %.1f" % (
        statistics.median(bare_ttft), statistics.median(http["ttft_ms_runs"]),
        statistics.median(report["decode_tok_s_runs"]), statistics.median(http["decode_tok_s_runs"])))


if __name__ == "__main__":
    main()
