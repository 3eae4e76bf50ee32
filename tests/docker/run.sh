#!/usr/bin/env bash
# Builds the image and checks it as a user would: health check, create, upload, a forward pass
# through tritonclient from the host, metrics on the published 8002, a REST inference on the
# published 8000, parameters surviving a
# restart on the volume, a non-root server, a grace below `docker stop`'s 10 s and a prompt
# `stop` (SIGTERM reaches the server; no 10 s wait ending in SIGKILL), a bind-mounted /data
# under `--user`, and a source change that rebuilds neither the torch nor the dependency layer.
# The GPU recipe (README) is built when its base image is present locally (GPU_BASE_IMAGE).
#
# Docker-engine stand-in: this machine has podman only (../shared/tools/container-env.sh). The
# flags that reach the local torch wheel are this machine's business and live here, not in the
# Dockerfile. Publishes on 127.0.0.1 only; removes what it made, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
IMAGE=${PARAMSERVE_TEST_IMAGE:-localhost/paramserve:test}
NAME=paramserve-test-$$
VOLUME=paramserve-test-data-$$
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
started=$(date +%s)

log() { printf '[docker-test %3ss] %s\n' $(( $(date +%s) - started )) "$*"; }
cleanup() {
  podman rm -f -t 0 "$NAME" "$NAME-bind" >/dev/null 2>&1 || true
  podman rmi -f "$IMAGE-edited" >/dev/null 2>&1 || true
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ENV_SCRIPT="$ROOT/../shared/tools/container-env.sh"
[ -f "$ENV_SCRIPT" ] || { echo "missing $ENV_SCRIPT (../shared beside the checkout)"; exit 1; }
log "preparing podman"
bash "$ENV_SCRIPT" >/dev/null
STATE=${CONTAINER_ENV_DIR:-/var/tmp/container-env}
WHEELS=${WHEELS:-/opt/wheels}

build() {  # build LOG [podman build args...]: this machine's flags, then the caller's
  local out=$1; shift
  podman build --format docker --network host \
    -v "$WHEELS:/opt/wheels:ro" -v "$STATE/pip.conf:/etc/pip.conf:ro" "$@" >"$out" 2>&1 \
    || { tail -40 "$out"; return 1; }
}
layers() { podman image inspect "$1" --format '{{range .RootFS.Layers}}{{println .}}{{end}}' | grep .; }

log "building $IMAGE"
build "$WORK/build.log" --build-arg TORCH_INDEX_URL= -t "$IMAGE" .
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
log "image size: $(( size / 1024 / 1024 )) MiB"

# A source change must reuse the torch and dependency layers: only the last two (COPY of the
# sources, their install) differ. Built from a copy with one source file edited.
log "rebuilding after a source change"
bash tests/install/copy-sources.sh "$WORK/ctx"
echo "# edited" >>"$WORK/ctx/service/__init__.py"
t0=$(date +%s)
build "$WORK/rebuild.log" --build-arg TORCH_INDEX_URL= -t "$IMAGE-edited" "$WORK/ctx"
layers "$IMAGE" >"$WORK/layers-a"; layers "$IMAGE-edited" >"$WORK/layers-b"
total=$(wc -l <"$WORK/layers-a")
shared=$(paste -d' ' "$WORK/layers-a" "$WORK/layers-b" | awk '$1 != $2 {exit} {n++} END {print n+0}')
podman rmi "$IMAGE-edited" >/dev/null
[ "$shared" -eq $(( total - 2 )) ] || {
  echo "a source change rebuilt $(( total - shared )) of $total layers (expected 2)"; exit 1; }
log "rebuilt in $(( $(date +%s) - t0 )) s; $shared of $total layers reused"

# The GPU recipe as the README gives it; only where its base image is already present (CI
# cannot pull one). Checks that the build works and that the base's torch was kept.
GPU_BASE=${GPU_BASE_IMAGE:-docker.io/pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime}
if podman image exists "$GPU_BASE"; then
  log "building the GPU recipe on $GPU_BASE"
  build "$WORK/gpu-build.log" --build-arg BASE_IMAGE="$GPU_BASE" --build-arg TORCH_INDEX_URL= \
    -t "$IMAGE-gpu" .
  torch_of() { podman run --rm --entrypoint python "$1" -c \
    'import torch; print(torch.__version__, torch.version.cuda)' 2>>"$WORK/podman.log"; }
  base_torch=$(torch_of "$GPU_BASE")
  podman run --rm --entrypoint python "$IMAGE-gpu" -c 'import paramserve.service.server' \
    2>>"$WORK/podman.log" || { echo "the GPU image cannot import the server"; exit 1; }
  gpu_torch=$(torch_of "$IMAGE-gpu")
  podman rmi "$IMAGE-gpu" >/dev/null
  [ "$gpu_torch" = "$base_torch" ] \
    || { echo "the GPU build replaced the base's torch ($base_torch) with $gpu_torch"; exit 1; }
  log "GPU recipe built; the base's torch kept (torch, cuda: $gpu_torch)"
else
  log "GPU recipe not built: $GPU_BASE is not present locally (untested here)"
fi

grace=$(podman run --rm --entrypoint python "$IMAGE" -c \
  "from paramserve.service.cli import build_parser; print(build_parser().parse_args(['serve']).grace_s)" \
  2>>"$WORK/podman.log")
log "grace in the image: ${grace} s"
$PY -c "import sys; sys.exit(not float(sys.argv[1]) < 10)" "$grace" \
  || { echo "the server's grace ($grace s) is not below docker stop's 10 s"; exit 1; }

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS_PORT=$(free_port)
HTTP_PORT=$(free_port)
podman volume create "$VOLUME" >/dev/null
# Without systemd, podman cannot schedule HEALTHCHECK timers and says so on stderr; the test
# runs the image's health check itself (`podman healthcheck run`), so those lines go to a log.
PODMAN_LOG="$WORK/podman.log"
start_container() {
  podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8001" -p "127.0.0.1:$METRICS_PORT:8002" \
    -p "127.0.0.1:$HTTP_PORT:8000" -v "$VOLUME:/data" "$@" "$IMAGE" >/dev/null 2>>"$PODMAN_LOG"
}
wait_healthy() {  # runs the image's own HEALTHCHECK command until it passes
  for _ in $(seq 1 90); do
    if podman healthcheck run "${1:-$NAME}" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  podman logs "${1:-$NAME}" | tail -20
  echo "container never became healthy"; return 1
}

log "starting the container on 127.0.0.1:$PORT"
start_container
wait_healthy
log "healthy"
uid=$(podman exec "$NAME" id -u)
[ "$uid" != 0 ] || { echo "the server runs as root"; exit 1; }
log "server runs as uid $uid"

export PARAMSERVE_SERVER=127.0.0.1:$PORT
cli() { $PY -m paramserve.service.cli "$@"; }
cli create dock --architecture sequential_mlp --seed 1 >/dev/null
$PY - "$WORK" <<'PYEOF'
import sys
import numpy as np
import torch
from paramserve.registry import get_architecture
work = sys.argv[1]
net = get_architecture("sequential_mlp").build(seed=5)
torch.save(net.state_dict(), f"{work}/w.pt")
x = torch.rand(3, 20)
np.save(f"{work}/x.npy", x.numpy())
np.save(f"{work}/expected.npy", net(x).detach().numpy())
PYEOF
cli upload dock "$WORK/w.pt" --alias production --quiet
log "uploaded; inferring through tritonclient from the host"

triton_infer() {
  $PY - "$PORT" "$WORK" <<'PYEOF'
import sys
import numpy as np
import tritonclient.grpc as grpcclient
port, work = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
assert client.is_server_live() and client.is_model_ready("dock", "production")
x = np.load(f"{work}/x.npy")
inp = grpcclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
y = client.infer("dock", [inp], model_version="production").as_numpy("output")
diff = float(np.abs(y - np.load(f"{work}/expected.npy")).max())
assert diff <= 1e-6, diff
print(f"max abs diff {diff:g}")
PYEOF
}
triton_infer
$PY -c "import sys, urllib.request as u; t = u.urlopen(sys.argv[1], timeout=10).read().decode(); \
assert 'paramserve_loaded_models' in t, t[:500]" "http://127.0.0.1:$METRICS_PORT/metrics"
log "metrics answer on the published 8002"
$PY - "$HTTP_PORT" "$WORK" <<'PYEOF'
import json, sys, urllib.request as u
import numpy as np
port, work = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}/v2"
assert u.urlopen(f"{base}/health/ready", timeout=10).status == 200
x = np.load(f"{work}/x.npy")
doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                   "data": x.ravel().tolist()}]}
request = u.Request(f"{base}/models/dock/versions/production/infer", json.dumps(doc).encode(),
                    {"Content-Type": "application/json"})
out = json.loads(u.urlopen(request, timeout=30).read())["outputs"][0]
y = np.array(out["data"], np.float32).reshape(out["shape"])
diff = float(np.abs(y - np.load(f"{work}/expected.npy")).max())
assert diff <= 1e-6, diff
PYEOF
log "KServe v2 REST answers on the published 8000 (ready, a JSON inference)"

log "stopping (SIGTERM) and restarting"
t0=$(date +%s%N)
podman stop -t 10 "$NAME" >/dev/null 2>>"$PODMAN_LOG"
stop_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
exit_code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
log "stop took ${stop_ms} ms, exit code $exit_code"
[ "$stop_ms" -lt 8000 ] || { echo "stop waited for the timeout: SIGTERM did not stop the server"; exit 1; }
[ "$exit_code" = 0 ] || { podman logs "$NAME" | tail -20; echo "server exited $exit_code"; exit 1; }
podman rm "$NAME" >/dev/null 2>>"$PODMAN_LOG"
start_container
wait_healthy
cli versions dock --json | $PY -c 'import json,sys; v=json.load(sys.stdin); assert [x["number"] for x in v]==[1] and v[0]["aliases"]==["production"], v'
triton_infer
log "parameters survived the restart on the volume"
podman stop -t 10 "$NAME" >/dev/null 2>>"$PODMAN_LOG"

# A bind-mounted host directory, as the README says: `--user` with the directory's owner.
BIND_NAME=$NAME-bind
BIND_UID=4242
mkdir -p "$WORK/host-data"
chown "$BIND_UID:$BIND_UID" "$WORK/host-data"
podman run -d --name "$BIND_NAME" --user "$BIND_UID:$BIND_UID" -v "$WORK/host-data:/data" \
  "$IMAGE" >/dev/null 2>>"$PODMAN_LOG"
wait_healthy "$BIND_NAME"
podman exec "$BIND_NAME" paramserve create bound --architecture small_mlp >/dev/null
podman stop -t 10 "$BIND_NAME" >/dev/null 2>>"$PODMAN_LOG"
podman rm "$BIND_NAME" >/dev/null 2>>"$PODMAN_LOG"
[ "$(stat -c %u "$WORK/host-data/registry.db")" = "$BIND_UID" ] \
  || { ls -ln "$WORK/host-data"; echo "registry.db is not the --user's"; exit 1; }
log "a bind-mounted /data works under --user $BIND_UID:$BIND_UID"
log "passed in $(( $(date +%s) - started )) s"
