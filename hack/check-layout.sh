#!/usr/bin/env bash
# Checks the source layout rules that keep the crates layered (docs/architecture.md):
#
# 1. engine depends on no Kubernetes or gRPC crate (kube*, k8s-openapi, tonic*).
# 2. engine/src/replication and engine/src/storage do no network or async IO: no
#    `tokio` and no `std::net` (address values come from `core::net`, which has no sockets).
# 3. No two modules of engine, node-agent or operator import each other. A module's
#    imports are the `crate::…` and `super::…` paths on its non-comment lines, each
#    resolved to the longest module path that is a file.
#
# `hack/check-layout.sh --imports` prints the import graph the third rule reads.
#
# Fast and offline: bash, grep and awk only. Exits non-zero with one line per broken
# rule, naming the file (and for a circle, both files with one import line of each).
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
fail() {
  printf 'check-layout: %s\n' "$*" >&2
  failed=1
}

# ----- 1. engine stays free of Kubernetes and gRPC -----------------------------------------
if hits=$(grep -nE '^[[:space:]]*"?(kube[A-Za-z0-9_-]*|k8s-openapi|tonic[A-Za-z0-9_-]*)"?[[:space:]]*(=|\.)' engine/Cargo.toml); then
  while IFS= read -r h; do
    fail "engine/Cargo.toml:${h%%:*}: engine must not depend on Kubernetes or gRPC crates: ${h#*:}"
  done <<<"$hits"
fi

# ----- 2. no network or async runtime in the replication core and the storage layer -------
for dir in engine/src/replication engine/src/storage; do
  [ -d "$dir" ] || { fail "$dir is missing (the layout rules name it)"; continue; }
  if hits=$(grep -rnE '(^|[^A-Za-z0-9_:])(tokio|std::net)([^A-Za-z0-9_]|$)' --include='*.rs' "$dir" |
    grep -vE '^[^:]+:[0-9]+:[[:space:]]*//'); then
    while IFS= read -r h; do
      fail "${h%%:*}:$(cut -d: -f2 <<<"$h"): $dir must not use tokio or std::net (network IO belongs in engine/src/net): $(cut -d: -f3- <<<"$h" | sed 's/^[[:space:]]*//')"
    done <<<"$hits"
  fi
done

# ----- 3. no two modules import each other ---------------------------------------------------
# Prints the imports between the files of the crate whose source is $1, one
# "from<TAB>to<TAB>line: text" line per pair (the first import of `to` in `from`).
imports() {
  local src=$1 files
  mapfile -t files < <(find "$src" -name '*.rs' -not -path "$src/bin/*" | sort)
  printf '%s\n' "${files[@]}" |
    awk -v src="$src" '
      # Module path of a file: src/a/b.rs -> a::b, src/a/mod.rs -> a, src/lib.rs -> "".
      function modpath(f,    m) {
        m = substr(f, length(src) + 2)
        sub(/\.rs$/, "", m)
        sub(/(^|\/)(mod|lib|main)$/, "", m)
        gsub(/\//, "::", m)
        return m
      }
      function join(a, b) { return a == "" ? b : (b == "" ? a : a "::" b) }
      # The file of the longest module prefix of path p.
      function resolve(p,    n, segs, i, cand, best) {
        n = split(p, segs, "::")
        best = file_of[""]
        cand = ""
        for (i = 1; i <= n; i++) {
          cand = join(cand, segs[i])
          if (cand in file_of) best = file_of[cand]
        }
        return best
      }
      function parent(m,    i, last) {
        last = 0
        for (i = 1; i < length(m); i++) if (substr(m, i, 2) == "::") last = i
        return last ? substr(m, 1, last - 1) : ""
      }
      # Records an edge for path `rest` (after "crate::" or the supers) seen in file f.
      function edge(f, base, rest, line, no,    t) {
        t = resolve(join(base, rest))
        if (t != "" && t != f && !((f, t) in seen)) {
          seen[f, t] = 1
          print f "\t" t "\t" no ": " line
        }
      }
      # Every `crate::…` / `super::…` path of one (comment-free) statement.
      function scan(f, s, line, no,    m, head, rest, base, nsup, i, body, n, parts, depth, c, parts_s) {
        while (match(s, /(^|[^A-Za-z0-9_$])(crate|(super::)*super)::(\{[^;]*\}|[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*)/)) {
          m = substr(s, RSTART, RLENGTH)
          s = substr(s, RSTART + RLENGTH)
          if (m !~ /^(crate|super)/) m = substr(m, 2)
          if (m ~ /^crate::/) {
            base = ""
            rest = substr(m, 8)
          } else {
            nsup = gsub(/super::/, "super::", m)
            rest = m
            gsub(/^(super::)+/, "", rest)
            # Inside an inline module (mod tests { … }) the first supers stay in this file.
            if (nsup <= inline_depth) continue
            base = modpath(f)
            for (i = inline_depth; i < nsup; i++) base = parent(base)
          }
          if (rest ~ /^\{/) {
            # A group: each top-level item names its own path.
            body = substr(rest, 2, length(rest) - 2)
            depth = 0
            for (i = 1; i <= length(body); i++) {
              c = substr(body, i, 1)
              if (c == "{") depth++
              else if (c == "}") depth--
              else if (c == "," && depth == 0) c = "\001"
              parts_s = parts_s c
            }
            n = split(parts_s, parts, "\001")
            for (i = 1; i <= n; i++) {
              head = parts[i]
              sub(/[[:space:]]+as[[:space:]].*$/, "", head)
              gsub(/[[:space:]]/, "", head)
              sub(/::\{.*$/, "", head)
              if (head != "" && head != "self" && head != "*") edge(f, base, head, line, no)
            }
          } else {
            edge(f, base, rest, line, no)
          }
        }
      }
      FNR == NR { file_of[modpath($0)] = $0; files[++nfiles] = $0; next }
      FNR == 1 { depth = 0; inline_depth = 0; delete open_at; pending = "" }
      {
        line = $0
        no = FNR
        code = $0
        sub(/\/\/.*$/, "", code)
        # A multi-line `use …{` group is read as one statement.
        if (pending != "" || code ~ /(crate|super)::\{[^}]*$/) {
          if (pending == "") { pending_line = line; pending_no = FNR }
          pending = pending " " code
          if (code !~ /;/) next
          code = pending
          line = pending_line
          no = pending_no
          pending = ""
        }
        if (code ~ /(^|[^A-Za-z0-9_])mod [A-Za-z_][A-Za-z0-9_]*[[:space:]]*\{/) {
          open_at[++inline_depth] = depth
        }
        scan(FILENAME, code, line, no)
        depth += gsub(/\{/, "{", code) - gsub(/\}/, "}", code)
        while (inline_depth > 0 && depth <= open_at[inline_depth]) inline_depth--
      }
    ' /dev/stdin "${files[@]}"
}

# Prints "A <-> B" (with one import line of each) for every pair of files of the crate
# whose source is $1 that import each other.
circles() {
  imports "$1" |
    awk -F'\t' '
      { key = $1 "\t" $2; witness[key] = $3; edges[++n] = key }
      END {
        for (i = 1; i <= n; i++) {
          split(edges[i], e, "\t")
          back = e[2] "\t" e[1]
          if ((back in witness) && e[1] < e[2]) {
            printf "%s <-> %s\n    %s line %s\n    %s line %s\n", e[1], e[2], e[1], witness[edges[i]], e[2], witness[back]
          }
        }
      }
    '
}

if [ "${1:-}" = "--imports" ]; then
  for src in engine/src node-agent/src operator/src; do imports "$src"; done
  exit 0
fi

for src in engine/src node-agent/src operator/src; do
  found=$(circles "$src")
  if [ -n "$found" ]; then
    fail "import circle in $src (two modules import each other; move what both need into one of them or a lower module):"
    printf '%s\n' "$found" >&2
  fi
done

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "check-layout: ok (engine has no Kubernetes/gRPC dependency; replication/ and storage/ do no network IO; no import circles in engine, node-agent, operator)"
