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
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$target"
    touch "$stamp"
  fi
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
# by `npm ci` when missing or older than the lock (needs node and npm: see ensure_system_programs).
ensure_npm_packages() {
  local dir=$1
  local installed="$dir/node_modules/.package-lock.json"
  if [ -f "$installed" ] && [ ! "$dir/package-lock.json" -nt "$installed" ]; then
    return 0
  fi
  echo "installing the npm packages of $dir (npm ci): $(cd "$dir" && node -e \
    'console.log(Object.entries(require("./package.json").dependencies).map(([n, v]) => n + "@" + v).join(" "))')" >&2
  if ! (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
    echo "error: 'npm ci' in $dir failed (is the npm registry reachable?); the tests need it once" >&2
    exit 1
  fi
}
