#!/usr/bin/env bash
# Creates .venv and installs the pinned dependencies without ever resolving a CUDA torch on a
# machine that has no CUDA. Usage: bash setup.sh   (then: . .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

# 1. torch, pinned, before anything that depends on it: a local wheel if pip has one, else the
#    CPU build when there is no NVIDIA driver (set TORCH_INDEX_URL to override the CPU index).
if ! pip install -q --no-index torch==2.13.0 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch==2.13.0
  else
    pip install -q torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
fi
# 2. the project and its pinned dependencies (torch already satisfied, so nothing re-resolves it),
#    with the web UI (gradio) and the test tools.
pip install -q -e ".[test,ui]"
# 3. open-clip-torch only supplies the CLIP BPE vocabulary file; its dependencies would pull torchvision.
pip install -q --no-deps open-clip-torch==3.3.0
# 4. the browser the web UI's test drives: Debian's chromium and its driver (root only; skipped when present).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: tests/test_ui_browser.py needs chromium and chromium-driver: sudo apt-get install chromium chromium-driver"
  fi
fi
echo "environment ready: . .venv/bin/activate"
