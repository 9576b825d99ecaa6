"""Decode speed with a JSON schema against without, through the daemon over HTTP.

Starts `llorch serve` on one model, then alternates rounds of N concurrent streamed
completions of `--tokens` tokens each: plain (`ignore_eos`) and constrained by a JSON schema
that cannot end within that many tokens (an array of at least 500 short strings), so both
kinds decode the same number of tokens. Reports the aggregate decode rate (tokens after each
stream's first, over the time from the first stream's first token to the last stream's last)
and the median over rounds.

Usage:
  python3 scripts/bench_structured.py --llorch target/release/llorch --source <model.gguf>
      [--streams 1,8] [--tokens 128] [--rounds 3] [--threads 2] [--out structured.json]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

SCHEMA = {
    "type": "array",
    "minItems": 500,
    "items": {"type": "string", "maxLength": 12},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(url, body, times):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and chunk["choices"][0].get("token_ids"):
                times.append(time.perf_counter())


def round_rate(url, streams, tokens, constrained):
    body = {
        "model": "m", "prompt": "List some words:", "max_tokens": tokens, "stream": True,
        "ignore_eos": True, "return_token_ids": True, "temperature": 0.8, "seed": 1,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA},
        }
    all_times = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=stream, args=(url, dict(body, seed=i), all_times[i]))
        for i in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = [len(t) for t in all_times]
    assert all(c == tokens for c in counts), counts
    start = min(t[0] for t in all_times)
    end = max(t[-1] for t in all_times)
    return sum(c - 1 for c in counts) / (end - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llorch", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="structured.json")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        pool = os.path.join(tmp, "pool.toml")
        with open(pool, "w") as f:
            f.write(f'version = 1\n[[models]]\nname = "m"\nsource = "{args.source}"\nmax_concurrent = 16\n')
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        daemon = subprocess.Popen(
            [args.llorch, "serve", "--config", pool, "--listen", f"127.0.0.1:{port}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    with urllib.request.urlopen(base + "/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            url = base + "/v1/completions"
            round_rate(url, 1, 8, True)  # builds the token trie; not measured
            results = {"source": args.source, "tokens": args.tokens, "threads": args.threads, "rows": []}
            for streams in map(int, args.streams.split(",")):
                rates = {"plain": [], "json_schema": []}
                for _ in range(args.rounds):
                    for kind in ("plain", "json_schema"):
                        rates[kind].append(round_rate(url, streams, args.tokens, kind == "json_schema"))
                row = {
                    "streams": streams,
                    "plain_tok_s": rates["plain"],
                    "json_schema_tok_s": rates["json_schema"],
                    "ratio_of_medians": statistics.median(rates["json_schema"]) / statistics.median(rates["plain"]),
                }
                results["rows"].append(row)
                print(json.dumps(row))
        finally:
            daemon.terminate()
            daemon.wait()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


main()
