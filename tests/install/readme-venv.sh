#!/usr/bin/env bash
# The README's install commands as a new user types them, in a fresh venv on a fresh copy of
# the sources: `pip install -e .`, then `pip install 'tritonclient[grpc]'` after it (which
# takes the newest tritonclient and its protobuf), then the tests that drive a real server
# through tritonclient and paramserve's client in that venv; then tritonclient 2.51 over it
# (protobuf 4.x) and the contract's and inference tests again.
#
# The commands are read from README.md, so the README and this check cannot drift apart.
# Leaves the checkout untouched (the editable install's build outputs go to the copy).
# Environment: PYTHON (the interpreter that makes the venv, default python3), KEEP_WORK=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/readme-venv.XXXXXX)
started=$(date +%s)
log() { printf '[readme-venv %3ss] %s\n' $(( $(date +%s) - started )) "$*"; }
cleanup() { [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT

# The client tests: tritonclient and paramserve's client against real servers on loopback.
TESTS=(tests/test_docs.py tests/test_service_inference.py tests/test_service_registry.py
       tests/test_protos.py)
for extra in tests/test_coexist*.py tests/test_client*.py tests/test_lean_import.py; do
  [ -f "$extra" ] && TESTS+=("$extra")
done

# The commands as the README spells them: the setup block's first install, and the
# tritonclient install named beside the Quick start's tritonclient example.
install_cmd=$($PY - <<'PYEOF'
import re, sys
readme = open("README.md").read()
setup = readme.split("## Set up and run", 1)[1]
block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
line = next(l for l in block.splitlines() if l.startswith("pip install -e ."))
print(line.split("&&")[0].split("#")[0].strip())
PYEOF
)
triton_cmd=$(grep -o "pip install 'tritonclient\[grpc\]'" README.md | head -1)
[ "$install_cmd" = "pip install -e ." ] || { echo "README's install is now: $install_cmd"; exit 1; }
[ -n "$triton_cmd" ] || { echo "README names no 'pip install 'tritonclient[grpc]''"; exit 1; }

log "copying the sources (tracked and untracked, not ignored) to $WORK/paramserve"
bash tests/install/copy-sources.sh "$WORK/paramserve"

cd "$WORK/paramserve"
$PY -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
unset PYTHONPATH
log "$install_cmd"
$install_cmd >"$WORK/install.log" 2>&1 || { tail -30 "$WORK/install.log"; exit 1; }
log "$triton_cmd"
eval "$triton_cmd" >"$WORK/triton.log" 2>&1 || { tail -30 "$WORK/triton.log"; exit 1; }
# The test tools (and the reference health/reflection clients the tests call the server with),
# constrained to what the user's two commands installed, so they change none of it.
pip freeze --exclude-editable | grep -v ' @ ' >"$WORK/user-stack.txt"
pip install -c "$WORK/user-stack.txt" pytest hypothesis grpcio-health-checking grpcio-reflection \
  >"$WORK/pytest-install.log" 2>&1 || { tail -30 "$WORK/pytest-install.log"; exit 1; }
pip list 2>/dev/null | grep -iE '^(tritonclient|protobuf|grpcio[a-z-]*|numpy|torch) ' \
  | tr -s ' ' | sed 's/^/    /'
# A conflict fails the check, after the tests have said what it breaks.
check_rc=0
pip check || check_rc=$?
paramserve --help >/dev/null

log "client tests in the venv: ${TESTS[*]}"
python -m pytest -p no:cacheprovider -q "${TESTS[@]}"
[ "$check_rc" = 0 ] || { echo "pip check: the venv's requirements conflict (above)"; exit 1; }

# The oldest tritonclient paramserve supports, installed after it: protobuf goes down to 4.x
# and numpy below 2 under an installed paramserve, which must keep working unrebuilt.
# (The reference health/reflection clients leave first: their gencode pins the newer protobuf.)
old_triton="pip install 'tritonclient[grpc]==2.51.0'"
log "$old_triton (after paramserve)"
pip uninstall -y grpcio-health-checking grpcio-reflection >/dev/null
eval "$old_triton" >"$WORK/triton-old.log" 2>&1 || { tail -30 "$WORK/triton-old.log"; exit 1; }
pip list 2>/dev/null | grep -iE '^(tritonclient|protobuf|numpy) ' | tr -s ' ' | sed 's/^/    /'
pip check
python -m pytest -p no:cacheprovider -q tests/test_protos.py tests/test_service_inference.py \
  tests/test_lean_import.py
log "passed in $(( $(date +%s) - started )) s"
