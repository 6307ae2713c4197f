#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): install, then run every test lane.
#   1. torch 2.13.0 (the small CPU build on this machine kind; any torch >= 2.6 works elsewhere),
#   2. ddpm_fast itself, editable, with the test extras; --no-build-isolation lets setup.py see that torch
#      and build the native kernels now, in build/native/ (an unchanged tree, e.g. after README command 1,
#      compiles nothing; a changed source recompiles alone),
#   3. the main pytest run (tests/, C++ ctest, nvcc compile checks and, where CI=true, the install lanes
#      of tests/test_install.py and tests/test_cuda_build.py included as tests),
#   4. the Triton lane in its own process under TRITON_INTERPRET=1 (read when kernels are decorated).
# Exits non-zero when any lane fails. pytest's exit code 5 ("no tests collected") fails the main lane
# (an empty suite is a broken suite) and is reported but tolerated in the Triton lane.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "${DDPM_FAST_SKIP_INSTALL:-0}" != "1" ]; then
  "$PY" -m pip install --quiet "torch==2.13.0" || { echo "torch install failed"; exit 1; }
  "$PY" -m pip install --quiet --no-build-isolation -e ".[test,triton]" || { echo "ddpm_fast install failed"; exit 1; }
fi
"$PY" -m ddpm_fast info || exit 1
# the kernels must be there: a missing native CPU backend fails here, with its reason (not as skipped tests)
"$PY" -c "import ddpm_fast, sys; n = ddpm_fast.backends()['native']; sys.exit(0 if n['available']['cpu'] else 'native CPU backend unavailable: ' + n['reason'])" || exit 1

status=0
"$PY" -m pytest tests --ignore=tests/triton -q -rs --durations=15 -p no:cacheprovider
rc=$?
if [ $rc -eq 5 ]; then echo "main lane: pytest collected no tests"; status=1;
elif [ $rc -ne 0 ]; then echo "main lane failed (pytest exit $rc)"; status=1; fi

if [ -d tests/triton ]; then
  TRITON_INTERPRET=1 "$PY" -m pytest tests/triton -q -rs --durations=10 -p no:cacheprovider
  rc=$?
  if [ $rc -eq 5 ]; then echo "triton lane: pytest collected no tests (tolerated)";
  elif [ $rc -ne 0 ]; then echo "triton lane failed (pytest exit $rc)"; status=1; fi
fi
exit $status
