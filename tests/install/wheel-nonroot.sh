#!/usr/bin/env bash
# A wheel installed by root into a fresh venv, used by an unprivileged user: builds the wheel
# (`pip wheel --no-deps .`) from a fresh copy of the sources, installs it as root, then as
# nobody (65534) starts `paramserve serve` on a free loopback port over a data dir nobody owns
# and runs `paramserve health`, `create` and `models`; stops the server by its PID (SIGTERM,
# exit 0). Nothing may be written into site-packages at run time, and `pip uninstall -y
# paramserve` must leave no paramserve file behind. Also: a data dir the user may not write is
# one line naming it. Needs root (it switches users).
# Environment: PYTHON (default: python3 when the user can run it, else /usr/bin/python3; a
# venv runs its base interpreter, and one under /root is out of an unprivileged user's reach),
# KEEP_WORK=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "wheel-nonroot.sh switches users: run it as root"; exit 1; }
RUN_UID=65534
PY=
for candidate in ${PYTHON:-} python3 /usr/bin/python3; do
  base=$(command -v "$candidate" >/dev/null && "$candidate" -c \
    'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null) || continue
  # Through env: setpriv's own exec still holds root's capabilities; the next exec does not.
  if setpriv --reuid="$RUN_UID" --regid="$RUN_UID" --clear-groups env "$base" -c 'import venv' \
      2>/dev/null; then PY=$base; break; fi
done
[ -n "$PY" ] || { echo "no Python that uid $RUN_UID can run (PYTHON=...)"; exit 1; }
WORK=$(mktemp -d /tmp/wheel-nonroot.XXXXXX)
started=$(date +%s)
server_pid=
log() { printf '[wheel-nonroot %3ss] %s\n' $(( $(date +%s) - started )) "$*"; }
cleanup() {
  [ -z "$server_pid" ] || kill -KILL "$server_pid" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

bash tests/install/copy-sources.sh "$WORK/src"
log "building the wheel"
(cd "$WORK/src" && python3 -m pip wheel --no-deps -q -w "$WORK/dist" .) >"$WORK/wheel.log" 2>&1 \
  || { tail -30 "$WORK/wheel.log"; exit 1; }
wheel=$(ls "$WORK"/dist/paramserve-*.whl)
log "built $(basename "$wheel"); what it holds under paramserve/protos:"
python3 -m zipfile -l "$wheel" | awk '{print $1}' | grep '^paramserve/protos/' | sed 's/^/    /'

log "installing it into a fresh venv owned by root ($("$PY" --version) at $PY)"
$PY -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$wheel" >"$WORK/install.log" 2>&1 \
  || { tail -30 "$WORK/install.log"; exit 1; }
site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ "$(stat -c %u "$site/paramserve")" = 0 ] || { echo "site-packages is not root's"; exit 1; }
find "$site" -printf '%p %s %T@\n' | sort >"$WORK/site-before.txt"  # all of it, mtimes too

# The user's own places: a data dir and a home; the venv is readable, not writable, for them.
chmod 755 "$WORK"
mkdir -p "$WORK/data" "$WORK/home"
chown "$RUN_UID:$RUN_UID" "$WORK/data" "$WORK/home"
USER_ENV=(setpriv --reuid="$RUN_UID" --regid="$RUN_UID" --clear-groups
          env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" LANG=C.UTF-8)
as_user() { "${USER_ENV[@]}" "$@"; }
as_user touch "$site/probe" 2>/dev/null && { echo "the user can write site-packages"; exit 1; }

log "serving as uid $RUN_UID"
# Not through a function: $! must be the server's PID (setpriv and env exec, keeping it).
"${USER_ENV[@]}" paramserve serve --data-dir "$WORK/data" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$WORK/serve.out" 2>"$WORK/serve.err" &
server_pid=$!
port=
for _ in $(seq 1 600); do
  port=$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$WORK/serve.out" | head -1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$port" ] || { cat "$WORK/serve.out" "$WORK/serve.err"; echo "server did not start"; exit 1; }
[ "$(stat -c %u /proc/$server_pid)" = "$RUN_UID" ] || { echo "server is not uid $RUN_UID"; exit 1; }
log "server PID $server_pid on 127.0.0.1:$port"

client() { as_user env PARAMSERVE_SERVER="127.0.0.1:$port" paramserve "$@"; }
client health
client create wheel-m --architecture small_mlp --seed 1 >/dev/null
client models | tee "$WORK/models.txt" | sed 's/^/    /'
grep -q wheel-m "$WORK/models.txt" || { echo "models does not list wheel-m"; exit 1; }
[ "$(stat -c %u "$WORK/data/registry.db")" = "$RUN_UID" ] || { echo "registry.db owner"; exit 1; }

kill -TERM "$server_pid"
rc=0; wait "$server_pid" || rc=$?
server_pid=
[ "$rc" = 0 ] || { tail -20 "$WORK/serve.err"; echo "server exited $rc on SIGTERM"; exit 1; }
log "server stopped by PID (exit 0)"

# A data dir the user may not write (root's): one line naming it, exit 1. Checked here, not in
# pytest: root writes anywhere, and this user cannot run the developer's interpreter.
mkdir "$WORK/readonly"
rc=0
as_user timeout 60 paramserve serve --data-dir "$WORK/readonly" --listen 127.0.0.1:0 \
  --metrics-listen off --http-listen off >"$WORK/readonly.out" 2>"$WORK/readonly.err" || rc=$?
if [ "$rc" != 1 ] || [ "$(wc -l <"$WORK/readonly.err")" != 1 ] \
    || ! grep -qF "$WORK/readonly" "$WORK/readonly.err" || grep -q Traceback "$WORK/readonly.err"; then
  cat "$WORK/readonly.err"; echo "an unwritable data dir: exit $rc, not one line naming it"; exit 1
fi
log "an unwritable data dir: exit 1, $(cat "$WORK/readonly.err")"

find "$site" -printf '%p %s %T@\n' | sort >"$WORK/site-after.txt"
diff "$WORK/site-before.txt" "$WORK/site-after.txt" \
  || { echo "running paramserve wrote into site-packages (above)"; exit 1; }

"$WORK/venv/bin/pip" uninstall -y -q paramserve
left=$(find "$site" "$WORK/venv/bin" -mindepth 1 -iname '*paramserve*' ! -type d
      find "$site" -mindepth 1 -ipath "$site/*paramserve*" ! -type d)
[ -z "$left" ] || { echo "pip uninstall left:"; echo "$left"; exit 1; }
# paramserve/ has no __init__.py (an implicit namespace package): pip removes its
# subpackages' files and folders but may leave the empty paramserve/ folder itself.
empty=$(find "$site" -mindepth 1 -ipath "$site/*paramserve*" -type d)
log "uninstalled: no paramserve file left in site-packages${empty:+ (an empty folder: ${empty#$site/})}"
log "passed in $(( $(date +%s) - started )) s"
