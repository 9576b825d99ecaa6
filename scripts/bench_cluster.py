#!/usr/bin/env python3
"""Remote hop of a cluster: time to first token and decode speed of streamed requests served
by a replica on the node that was asked (local) and through another node (remote).

Starts two `llorch serve` processes on loopback joined by `[cluster]`: node `b` runs the
model, node `a` runs nothing and sends its requests to `b`. Each round asks `b` directly and
then `a`, alternately, with the same greedy request (`ignore_eos`, so every answer has
`--max-tokens` tokens), and with `--concurrency` streams at once for the aggregate. Prints a
markdown table and writes it, with the raw figures as JSON, under `--out` when given.

    python3 scripts/bench_cluster.py --llorch target/release/llorch \
        --model "$LLORCH_FIXTURES/models/stories260k" --rounds 10 --out docs/bench-runs/NAME
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(llorch, config, cookie):
    env = dict(os.environ, LLORCH_CLUSTER_COOKIE=cookie)
    proc = subprocess.Popen(
        [llorch, "serve", "--config", config, "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("llorch listening on "):
            url = line.split("llorch listening on ", 1)[1].strip()
            # Keep draining stderr so the daemon never blocks on a full pipe.
            subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
            return proc, url
    raise SystemExit(f"{config}: the daemon exited before listening")


def get(url, path):
    with urllib.request.urlopen(url + path) as response:
        return json.load(response)


def stream(url, body):
    """One streamed completion: (time to first token, the times of every content chunk)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"{url}: {response.status} {response.read()!r}")
    times = []
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            data = frame.decode().removeprefix("data: ")
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter() - started)
    conn.close()
    return times


def measure(url, model, tokens, concurrency):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: stream(url, body), range(concurrency)))
    wall = time.perf_counter() - started
    first = runs[0]
    decode = (first[-1] - first[0]) / max(len(first) - 1, 1)
    chunks = sum(len(r) for r in runs)
    return {"ttft_ms": first[0] * 1000, "ms_per_token": decode * 1000,
            "aggregate_chunks_per_s": chunks / wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llorch", required=True)
    parser.add_argument("--model", required=True, help="a model source for pool.toml")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()

    cookie = "bench-cluster-cookie"
    pa, pb = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for node, port, peer, models in [("a", pa, pb, ""), ("b", pb, pa, args.model)]:
            text = (f'version = 1\n[cluster]\nnode = "{node}"\nlisten = "127.0.0.1:{port}"\n'
                    f'peers = ["127.0.0.1:{peer}"]\n')
            if models:
                source = os.path.abspath(models) if os.path.exists(models) else models
                text += f'[[models]]\nname = "m"\nsource = "{source}"\n'
            configs[node] = os.path.join(tmp, f"{node}.toml")
            with open(configs[node], "w") as handle:
                handle.write(text)
        b, url_b = start(args.llorch, configs["b"], cookie)
        a, url_a = start(args.llorch, configs["a"], cookie)
        try:
            deadline = time.time() + 60
            while not any(m["id"] == "m" for m in get(url_a, "/v1/models")["data"]):
                if time.time() > deadline:
                    raise SystemExit("node a never listed b's model")
                time.sleep(0.2)
            measure(url_b, "m", args.max_tokens, 1)
            measure(url_a, "m", args.max_tokens, 1)
            rows = {"local": {1: [], args.concurrency: []}, "remote": {1: [], args.concurrency: []}}
            for _ in range(args.rounds):
                for where, url in [("local", url_b), ("remote", url_a)]:
                    for streams in (1, args.concurrency):
                        rows[where][streams].append(measure(url, "m", args.max_tokens, streams))
        finally:
            for proc in (a, b):
                proc.kill()
                proc.wait()

    def median(where, streams, key):
        return statistics.median(r[key] for r in rows[where][streams])

    lines = [
        f"model `{args.model}` on node b, {args.max_tokens} tokens per stream, "
        f"{args.rounds} rounds alternating local and remote, medians",
        "",
        "| served | streams | TTFT ms | ms per token (first stream) | aggregate tokens/s |",
        "|---|---|---|---|---|",
    ]
    for streams in (1, args.concurrency):
        for where in ("local", "remote"):
            lines.append(
                f"| {where} | {streams} | {median(where, streams, 'ttft_ms'):.2f} | "
                f"{median(where, streams, 'ms_per_token'):.3f} | "
                f"{median(where, streams, 'aggregate_chunks_per_s'):.1f} |")
    hop = median("remote", 1, "ms_per_token") - median("local", 1, "ms_per_token")
    ttft = median("remote", 1, "ttft_ms") - median("local", 1, "ttft_ms")
    lines += ["", f"remote hop, one stream: {hop:+.3f} ms per token, {ttft:+.2f} ms to first token"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cluster.md"), "w") as handle:
            handle.write(report + "\n")
        with open(os.path.join(args.out, "cluster.json"), "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
