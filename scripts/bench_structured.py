"""Decode speed with a JSON schema against without, through the daemon over HTTP.

Starts `llorch serve` on one model, then alternates rounds of N concurrent streamed
completions of `--tokens` tokens each: plain (`ignore_eos`) and constrained by a JSON schema
that cannot end within that many tokens (an array of at least 500 short strings), so both
kinds decode the same number of tokens. Reports the aggregate decode rate (tokens after each
stream's first, over the time from the first stream's first token to the last stream's last)
and the median over rounds.

With `--llama-server`, the same rounds run against llama.cpp's server on the same GGUF file
in the same run (its native `/completion` endpoint, `json_schema` turned into its own GBNF
grammar, `--parallel` slots for the streams), each server alone on the machine in turn;
`--llama-samplers` picks its sampling: llorch's (temperature over the whole vocabulary) or
llama.cpp's defaults.

Usage:
  python3 scripts/bench_structured.py --llorch target/release/llorch --source <model.gguf>
      [--llama-server <llama-server> [--llama-samplers full|default]] [--streams 1,8] [--tokens 128] [--rounds 3]
      [--threads 2] [--out structured.json]
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


def llama_stream(url, body, times):
    """One streamed `/completion` of llama.cpp's server: a time per token as its chunk comes."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            now = time.perf_counter()
            times.extend(now for _ in chunk.get("tokens") or [])
            if chunk.get("stop"):
                # The last token comes in the closing chunk, which carries no token list.
                times.extend(now for _ in range(chunk["tokens_predicted"] - len(times)))


def llama_round_rate(url, streams, tokens, constrained, samplers="full"):
    body = {
        "prompt": "List some words:", "n_predict": tokens, "stream": True, "ignore_eos": True,
        "return_tokens": True, "temperature": 0.8, "seed": 1, "cache_prompt": False,
    }
    if samplers == "full":
        # llorch's: temperature over the whole vocabulary.
        body.update(top_k=0, top_p=1.0, min_p=0.0)
    if constrained:
        body["json_schema"] = SCHEMA
    return timed_round(llama_stream, url, body, streams, tokens)


def timed_round(fn, url, body, streams, tokens):
    all_times = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=fn, args=(url, dict(body, seed=i), all_times[i]))
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


def round_rate(url, streams, tokens, constrained):
    body = {
        "model": "m", "prompt": "List some words:", "max_tokens": tokens, "stream": True,
        "ignore_eos": True, "return_token_ids": True, "temperature": 0.8, "seed": 1,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA},
        }
    return timed_round(stream, url, body, streams, tokens)


def wait_ready(base, path):
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + path, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{base}{path} never answered")


def measure(rate, url, streams_list, tokens, rounds):
    """Rows of alternating plain and constrained rounds per stream count."""
    rows = []
    for streams in streams_list:
        rates = {"plain": [], "json_schema": []}
        for _ in range(rounds):
            for kind in ("plain", "json_schema"):
                rates[kind].append(rate(url, streams, tokens, kind == "json_schema"))
        row = {
            "streams": streams,
            "plain_tok_s": rates["plain"],
            "json_schema_tok_s": rates["json_schema"],
            "ratio_of_medians": statistics.median(rates["json_schema"]) / statistics.median(rates["plain"]),
        }
        rows.append(row)
        print(json.dumps(row))
    return rows


def llama_rows(args, streams_list):
    port = free_port()
    slots = max(streams_list)
    server = subprocess.Popen(
        [args.llama_server, "-m", args.source, "-t", str(args.threads), "--parallel", str(slots),
         "-c", str(slots * (args.tokens + 64)), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, "/health")
        url = base + "/completion"
        def rate(url, streams, tokens, constrained):
            return llama_round_rate(url, streams, tokens, constrained, args.llama_samplers)

        rate(url, 1, 8, True)  # warm-up; not measured
        return measure(rate, url, streams_list, args.tokens, args.rounds)
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llorch", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="structured.json")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server, run on the same file")
    parser.add_argument(
        "--llama-samplers", choices=["full", "default"], default="full",
        help="full: temperature over the whole vocabulary, as llorch samples; default: "
        "llama.cpp's top-k 40, top-p 0.95, min-p 0.05",
    )
    args = parser.parse_args()
    streams_list = [int(n) for n in args.streams.split(",")]
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
            wait_ready(base, "/ready")
            url = base + "/v1/completions"
            round_rate(url, 1, 8, True)  # builds the token trie; not measured
            results = {"source": args.source, "tokens": args.tokens, "threads": args.threads}
            results["rows"] = measure(round_rate, url, streams_list, args.tokens, args.rounds)
        finally:
            daemon.terminate()
            daemon.wait()
    if args.llama_server:
        print("llama.cpp server:")
        results["llama_cpp_samplers"] = args.llama_samplers
        results["llama_cpp_rows"] = llama_rows(args, streams_list)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


main()
