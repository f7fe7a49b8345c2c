# Sourced (not run) by hack/test.sh and by developers: points BLOCKVOL_TOOLS_BIN at the
# pinned Kubernetes tools built by hack/tools/build.sh and puts them first on PATH.
# shellcheck shell=bash
BLOCKVOL_TOOLS_BIN="$(bash "$(dirname "${BASH_SOURCE[0]}")/build.sh" --print-bin)"
export BLOCKVOL_TOOLS_BIN
case ":$PATH:" in
  *":$BLOCKVOL_TOOLS_BIN:"*) ;;
  *) export PATH="$BLOCKVOL_TOOLS_BIN:$PATH" ;;
esac
