#!/usr/bin/env bash
# Stops the local blockvol cluster started by hack/up.sh: unmounts and detaches every
# volume the way the kubelet would (blockvol-local unmount --all), then cleans up any
# mount, loop device or attach proxy still left under its state dir, then stops every recorded
# process in reverse start order (SIGTERM, then SIGKILL after a bound). Logs are kept in
# $BLOCKVOL_LOCAL_DIR/logs; everything else under the state dir is removed.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE="${BLOCKVOL_LOCAL_DIR:-$PWD/.local-cluster}"
# How long a process may take to exit after SIGTERM, in seconds.
STOP_TIMEOUT_S=15
# How long unmounting and detaching every volume through the CSI plugins may take.
UNMOUNT_TIMEOUT_S=180

[ -d "$STATE" ] || { echo "nothing to stop: $STATE does not exist"; exit 0; }

# The kubelet's part first, while the control plane, the agents and the CSI plugins still
# run: unpublish, unstage and detach every mounted volume (the agents then tear down
# their loop devices and attach proxies themselves).
if [ -x target/debug/blockvol-local ] && [ -f "$STATE/kubeconfig" ] && [ -f "$STATE/ready" ]; then
  timeout "${UNMOUNT_TIMEOUT_S}s" target/debug/blockvol-local unmount --all --state-dir "$STATE" \
    || echo "unmounting through the CSI plugins failed; cleaning up directly"
fi
# Whatever is left, in the only safe order: filesystems and bind mounts (deepest first),
# then loop devices backed by files under the state dir, then the FUSE mounts under them,
# then the attach proxies (or an earlier version's nbdfuse) serving those.
if command -v findmnt >/dev/null; then
  findmnt -rn -o TARGET,FSTYPE | grep -F "$STATE/" | grep -v ' fuse' | awk '{print $1}' \
    | sort -r | while read -r m; do
    echo "unmounting $m"
    umount "$m" || umount -l "$m"
  done
fi
losetup -nl -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
  case "$file" in
    "$STATE"/*) echo "detaching $dev ($file)"; losetup -d "$dev" ;;
  esac
done
if command -v findmnt >/dev/null; then
  findmnt -rn -o TARGET | grep -F "$STATE/" | sort -r | while read -r m; do
    echo "unmounting $m"
    umount "$m" || umount -l "$m"
  done
fi
pgrep -af 'nbdfuse|attach-proxy' 2>/dev/null | grep -F "$STATE/" | while read -r pid _; do
  echo "stopping attach process (pid $pid)"
  kill "$pid" 2>/dev/null
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
