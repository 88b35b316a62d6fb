# Sourced by the set-up scripts. pip_quiet PYTHON ARGS...: `PYTHON -m pip ARGS -q`, its errors shown in full,
# its notes about this machine's missing local index folders dropped.
pip_quiet() {
  local python=$1 log; shift
  log=$(mktemp)
  if ! "$python" -m pip "$@" -q 2>"$log"; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
}
