# Sourced by the provisioning scripts: `check_lock FILE` refuses a lock file made for another
# Python or platform than this machine's (its wheels' hashes could not match), saying how to
# make one for this machine. The first line of each lock names what it was made for.
check_lock() {
  local want have
  want="$(head -1 "$1" | sed -n 's/^# \(python [0-9.]* [a-z]* [A-Za-z0-9_]*\):.*/\1/p')"
  have="$(python3 -c 'import platform as p; v = p.python_version_tuple(); print(f"python {v[0]}.{v[1]} {p.system().lower()} {p.machine()}")')"
  if [ "$want" != "$have" ]; then
    echo "peft-compat: $1 pins wheels for $want, this machine has $have;" \
      "run scripts/lock.sh to pin them for this machine (and review the diff)" >&2
    return 1
  fi
}
