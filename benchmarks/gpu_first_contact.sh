#!/usr/bin/env bash
# GPU first contact (issue 21): one device call of at most 9 minutes (run it with timeout_s 560).
# The steps, their time limits and the files under $OUT are described in gpu_first_contact.py's header.
# Everything printed goes to $OUT/first_contact.log through tee.
#
#   bash benchmarks/gpu_first_contact.sh                                  # on the device machine
#   OUT=$(mktemp -d) bash benchmarks/gpu_first_contact.sh --cpu-dry-run   # here: no build, the interpreter,
#                                                                         # bench --quick on the CPU
# The dry run proves selection and plumbing only: every GPU-only test is skipped on the CPU.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
: "${OUT:?set OUT to the folder that receives the logs (the device tool sets it; dry run: OUT=\$(mktemp -d))}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
timeout -k 10 545 "$PY" -u benchmarks/gpu_first_contact.py --python "$PY" "$@" 2>&1 | tee "$OUT/first_contact.log"
