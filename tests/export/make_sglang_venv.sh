#!/usr/bin/env bash
# Create .venv-sglang/ (the SGLang client for the export tests) idempotently.
#   bash tests/export/make_sglang_venv.sh [VENV_DIR]      (default: .venv-sglang in the repository root)
# The CPU torch pinned by requirements/constraints.txt goes in first; then requirements/sglang.txt with
# --no-deps (sglang's declared dependencies include multi-GB CUDA wheels it does not need to load a draft).
# A stamp file records the requirement files it was built from; a second run with the same files does nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/.venv-sglang}"
python="${PYTHON:-python3}"
reqs="$root/requirements/sglang.txt"
constraints="$root/requirements/constraints.txt"
stamp="$venv/.specforge-sglang-stamp"
want="$(cat "$reqs" "$constraints" | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "[sglang-venv] $venv is up to date"
    exit 0
fi
echo "[sglang-venv] building $venv"
rm -f "$stamp"
test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/pip" --disable-pip-version-check -q)
torch_pin="$(grep -E '^torch==' "$constraints")"
"${pip[@]}" install "$torch_pin"
"${pip[@]}" install --no-deps -c "$constraints" -r "$reqs"
# The venv is only usable if this import works (with the shims the test driver applies).
"$venv/bin/python" - <<'PY'
import importlib.util, sys
spec = importlib.util.find_spec("sglang")
assert spec is not None, "sglang did not install"
assert importlib.util.find_spec("torchvision") is None, "torchvision must stay absent (the driver stubs it)"
import torch
assert torch.version.cuda is None, f"a CUDA torch ({torch.__version__}) got into the sglang venv"
PY
echo "$want" > "$stamp"
echo "[sglang-venv] ready: $venv"
