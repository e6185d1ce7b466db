#!/bin/bash
# Alternates `trustsplit bench step` runs of two (or more) builds and prints each run's enclave
# time and phases: the A/B comparisons quoted in the module docs ("alternated runs") were made this way,
# because the shared hosts' speed drifts more between minutes than most changes move it.
#
# usage: scripts/ab_enclave.sh ROUNDS MODEL [bench step flags ...] -- BINARY_A BINARY_B [...]
# e.g.:  scripts/ab_enclave.sh 4 vgg16 --scheme asymml --basis batch --rank-schedule 1,2,4,4,8 \
#            --subspace fast -- /tmp/trustsplit-before target/release/trustsplit
# Each run: `--steps 6 --device cpu:1 --baseline none` (no tee-only baseline: enclave time only).
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
rounds=$1
model=$2
shift 2
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    args+=("$1")
    shift
done
if [ $# -eq 0 ]; then
    echo "ab_enclave.sh: no '--' before the binaries" >&2
    exit 2
fi
shift
for _ in $(seq "$rounds"); do
    for binary in "$@"; do
        out=$("$binary" bench step --steps 6 --device cpu:1 --model "$model" --baseline none "${args[@]}" 2>&1)
        enclave=$(echo "$out" | grep -oE "\([0-9]+ ms enclave" | grep -oE "[0-9]+" || echo "?")
        phases=$(echo "$out" | grep "enclave phases" | sed 's/.*per step: //' || true)
        echo "$binary $model enclave $enclave ms | $phases"
    done
done
