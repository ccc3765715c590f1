# Shared by scripts/serve and scripts/test.

PYTHON=${PYTHON:-python3}

# ensure_venv [extra]: .venv with the project installed (editable), plus an optional extra.
ensure_venv() {
  local extra=${1:-}
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      # Debian ships venv's ensurepip in its own package.
      if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      fi
      "$PYTHON" -m venv .venv || {
        echo "error: '$PYTHON -m venv' failed; on Debian: apt-get install python3-venv" >&2
        exit 1
      }
    fi
  fi
  local target="."
  [ -n "$extra" ] && target=".[${extra}]"
  # Re-install only when pyproject.toml changed since the last install into this venv.
  local stamp=".venv/.installed-${extra:-base}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing the project${extra:+ with its $extra extra} and its dependencies into .venv" \
         "(a minute or two the first time; full log in .venv/install.log)" >&2
    : > .venv/install.log
    pip_with_progress --upgrade pip
    pip_with_progress -e "$target"
    restore_opentelemetry_protos .venv/bin/python
    touch "$stamp"
  fi
}

# restore_opentelemetry_protos PYTHON: xds-protos ships an old copy of opentelemetry/proto/*_pb2.py that
# overwrites opentelemetry-proto's when pip happens to install it last; the OTLP exporter then fails to
# import (no InstrumentationScope). Re-installing opentelemetry-proto alone makes its files win,
# whatever the install order was. deploy/install.sh does the same for the image.
restore_opentelemetry_protos() {
  local version
  version=$("$1" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
  "$1" -m pip install --quiet --no-deps --force-reinstall "opentelemetry-proto==$version" >>.venv/install.log 2>&1
}

# pip_with_progress ARGS...: `pip install ARGS`, its full output in .venv/install.log, and on stderr one
# progress line (rewritten in place on a terminal; every tenth package otherwise). On failure the end
# of the log is shown and the script stops. An install that installed nothing new (no "Successfully
# installed" line: pip already current) is not a failure, which the grep below would be under pipefail.
pip_with_progress() {
  local log=.venv/install.log pid status=0 count shown=-1 last
  .venv/bin/python -m pip install --progress-bar off "$@" >>"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    count=$(grep -c '^Collecting' "$log" || true)
    last=$(grep -E '^(Collecting|Installing collected|Building)' "$log" | tail -n 1 | cut -c1-60 || true)
    if [ -t 2 ]; then
      printf '\r\033[K  %s packages so far: %s' "$count" "$last" >&2
    elif [ "$count" -ne "$shown" ] && [ $((count % 10)) -eq 0 ] && [ "$count" -gt 0 ]; then
      echo "  $count packages so far" >&2
      shown=$count
    fi
  done
  wait "$pid" || status=$?
  [ -t 2 ] && printf '\r\033[K' >&2
  if [ "$status" -ne 0 ]; then
    echo "error: pip install $* failed; the end of $log:" >&2
    tail -n 25 "$log" >&2
    exit "$status"
  fi
  grep -o '^Successfully installed.*' "$log" | tail -n 1 | awk '{ if (NF > 2) print "  installed " NF - 2 " packages" }' >&2 || true
}

# ensure_system_programs program:debian-package ...: apt-get installs the packages whose program is missing.
ensure_system_programs() {
  local missing=() pair program package
  for pair in "$@"; do
    program=${pair%%:*}
    package=${pair##*:}
    if ! command -v "$program" >/dev/null 2>&1 && [[ ! " ${missing[*]} " =~ " ${package} " ]]; then
      missing+=("$package")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages the tests start for real: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "error: the tests need these Debian packages, which are not installed: ${missing[*]}" >&2
    echo "       install them (sudo apt-get install --no-install-recommends ${missing[*]}) and run again" >&2
    exit 1
  fi
}

# ensure_npm_packages DIR: the npm packages DIR/package-lock.json pins, installed into DIR/node_modules
# by `npm ci` unless the lock is the one installed last (a checksum, not a date: checkouts touch dates).
# Needs node and npm: see ensure_system_programs.
ensure_npm_packages() {
  local dir=$1
  local stamp="$dir/node_modules/.installed-lock-sha256" lock_sum
  lock_sum=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ]; then
    return 0
  fi
  echo "installing the npm packages of $dir (npm ci): $(cd "$dir" && node -e \
    'console.log(Object.entries(require("./package.json").dependencies).map(([n, v]) => n + "@" + v).join(" "))')" >&2
  if ! (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
    echo "error: 'npm ci' in $dir failed (is the npm registry reachable?); the tests need it once" >&2
    exit 1
  fi
  echo "$lock_sum" >"$stamp"
}
