#!/usr/bin/env bash
# Builds the CUDA daemon and the CUDA builds of the daemon and admin test suites on this
# machine (no GPU needed; see ../shared/docs/CUDA.md), then packs them, compressed, with the
# reference fixtures into .gpu/ (git-ignored), which the GPU machine receives as a carried path.
# There, run: python3 scripts/gpu/issue6.py all (issue 6) or scripts/gpu/issue19.py all (issue 19)
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXTURES="${LLORCH_FIXTURES:-../shared/fixtures}"
# shellcheck disable=SC1091
source ../shared/cuda/cuda_env.sh
export CARGO_TARGET_DIR=target-cuda
cargo build --release --features cuda
tests=$(cargo test --release --features cuda --test daemon --test admin --test candle_llama --test cuda_kernels --no-run \
    --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
rm -rf .gpu/tests .gpu/llorch.xz
mkdir -p .gpu/tests .gpu/fixtures/models
xz -T2 -6 -c target-cuda/release/llorch >.gpu/llorch.xz
while read -r name path; do
    # Function names stay (a hung test is backtraced on the GPU machine); debug info goes.
    strip --strip-debug -o "/tmp/$name" "$path"
    xz -T2 -6 -c "/tmp/$name" >".gpu/tests/$name.xz"
done <<<"$tests"
cp "$FIXTURES/index.json" .gpu/fixtures/
for model in "$FIXTURES"/models/*/; do
    name=$(basename "$model")
    mkdir -p ".gpu/fixtures/models/$name"
    cp "$model"/*.json "$model"/*.safetensors ".gpu/fixtures/models/$name/"
done
du -sh .gpu
