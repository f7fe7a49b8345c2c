#!/usr/bin/env bash
# Stops the local blockvol cluster started by hack/up.sh: unmounts what is mounted under
# its state dir, detaches loop devices backed by files there, then stops every recorded
# process in reverse start order (SIGTERM, then SIGKILL after a bound). Logs are kept in
# $BLOCKVOL_LOCAL_DIR/logs; everything else under the state dir is removed.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE="${BLOCKVOL_LOCAL_DIR:-$PWD/.local-cluster}"
# How long a process may take to exit after SIGTERM, in seconds.
STOP_TIMEOUT_S=15

[ -d "$STATE" ] || { echo "nothing to stop: $STATE does not exist"; exit 0; }

# Mounts first (deepest first), while the node agents still serve the devices under them.
if command -v findmnt >/dev/null; then
  findmnt -rn -o TARGET | grep -F "$STATE/" | sort -r | while read -r m; do
    echo "unmounting $m"
    umount "$m" || umount -l "$m"
  done
fi
# Loop devices whose backing file lives under the state dir.
losetup -nl -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
  case "$file" in
    "$STATE"/*) echo "detaching $dev ($file)"; losetup -d "$dev" ;;
  esac
done

stop_pid() {
  local name=$1 pid=$2
  kill -0 "$pid" 2>/dev/null || return 0
  # Each process was started in its own session, so its group id is its pid.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (pid $pid) did not exit after ${STOP_TIMEOUT_S}s; killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  fi
  echo "stopped $name (pid $pid)"
}

if [ -d "$STATE/pids" ]; then
  for f in $(ls -1 "$STATE/pids"/*.pid 2>/dev/null | sort -r); do
    name=$(basename "$f" .pid)
    stop_pid "${name#*-}" "$(cat "$f")"
    rm -f "$f"
  done
fi
find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
echo "stopped; logs kept in $STATE/logs"
