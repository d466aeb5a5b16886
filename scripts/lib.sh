# Shared helpers for the project's scripts: install what is missing, start the
# real backing services (ClickHouse, FerretDB) on 127.0.0.1 with their state
# under .run/, and wait for them. Sourced, never run directly.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${FGP_RUN_DIR:-$REPO_ROOT/.run}"
# Built tools and the cargo target dir live outside the checkout so a fresh
# clone reuses them; everything is rebuilt when absent, so nothing depends on them.
CACHE_DIR="${FGP_CACHE_DIR:-$HOME/.cache/fhir-group-proxy}"
TOOLS_DIR="${FGP_TOOLS_DIR:-$CACHE_DIR/tools}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_DIR/target}"
FERRETDB_VERSION="v1.24.2"

CLICKHOUSE_HTTP_PORT="${FGP_CLICKHOUSE_HTTP_PORT:-18123}"
CLICKHOUSE_TCP_PORT="${FGP_CLICKHOUSE_TCP_PORT:-19000}"
FERRETDB_PORT="${FGP_FERRETDB_PORT:-27018}"
# FerretDB's own Prometheus metrics (commands received, from every client), so
# the bench can count what the legacy server's probes cost besides the proxy's.
FERRETDB_DEBUG_PORT="${FGP_FERRETDB_DEBUG_PORT:-18088}"

export FGP_TEST_CLICKHOUSE_URL="${FGP_TEST_CLICKHOUSE_URL:-http://127.0.0.1:$CLICKHOUSE_HTTP_PORT}"
export FGP_TEST_MONGO_URI="${FGP_TEST_MONGO_URI:-mongodb://127.0.0.1:$FERRETDB_PORT/}"
export FGP_TEST_FERRETDB_METRICS_URL="${FGP_TEST_FERRETDB_METRICS_URL:-http://127.0.0.1:$FERRETDB_DEBUG_PORT/debug/metrics}"

log() { printf '\033[1m[fhir-group-proxy]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: cmake (pingora's zlib-ng), a C toolchain, ClickHouse, curl, python3
# (the module-graph check of scripts/test.sh).
ensure_debian_packages() {
  local wanted=(cmake build-essential pkg-config curl ca-certificates python3 clickhouse-server clickhouse-client)
  local missing=()
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Rust via rustup when cargo is absent (Debian's own rustc is too old for pingora).
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    log "installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
      command -v rustup >/dev/null 2>&1 && rustup component add "$component"
    fi
  done
}

# Go >= 1.24 is needed for `go get -tool`; Debian 12 ships 1.19, so fetch the
# official toolchain only when no suitable go is on PATH.
ensure_go() {
  if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  local ok=0
  if command -v go >/dev/null 2>&1; then
    local minor
    minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
    [ "${minor:-0}" -ge 24 ] && ok=1
  fi
  if [ "$ok" -eq 0 ]; then
    local go_version="1.24.6"
    log "installing Go $go_version under $TOOLS_DIR/go"
    mkdir -p "$TOOLS_DIR"
    curl -sSfL "https://go.dev/dl/go${go_version}.linux-amd64.tar.gz" | tar -xz -C "$TOOLS_DIR"
    export PATH="$TOOLS_DIR/go/bin:$PATH"
  fi
}

# FerretDB from the Go module proxy. Its cmd/ferretdb panics at start unless
# build/version/version.txt exists, and release tooling generates that file, so
# the module is copied out of the read-only module cache, the file is written,
# and `go install` builds from that copy through a throw-away -modfile.
ensure_ferretdb() {
  local bin="$TOOLS_DIR/bin/ferretdb"
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "version: $FERRETDB_VERSION"; then
    return
  fi
  ensure_go
  log "installing FerretDB $FERRETDB_VERSION with the go command"
  local mod_dir="$REPO_ROOT/tools/ferretdb" work="$TOOLS_DIR/ferretdb-build"
  (
    cd "$mod_dir"
    go get -tool "github.com/FerretDB/FerretDB/cmd/ferretdb@$FERRETDB_VERSION"
    go mod download github.com/FerretDB/FerretDB
    local src
    src="$(go list -m -f '{{.Dir}}' github.com/FerretDB/FerretDB)"
    rm -rf "$work" && mkdir -p "$work"
    cp -r "$src" "$work/src" && chmod -R u+w "$work/src"
    echo "$FERRETDB_VERSION" >"$work/src/build/version/version.txt"
    cp go.mod go.sum "$work/"
    go mod edit -modfile="$work/go.mod" -replace "github.com/FerretDB/FerretDB=$work/src"
    GOBIN="$TOOLS_DIR/bin" go install -modfile="$work/go.mod" github.com/FerretDB/FerretDB/cmd/ferretdb
  )
  "$bin" --version | grep -q "version: $FERRETDB_VERSION" || die "FerretDB install failed"
}

ensure_all_installed() {
  ensure_debian_packages
  ensure_rust
  ensure_ferretdb
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() {
  local what="$1" seconds="$2"; shift 2
  local i
  for ((i = 0; i < seconds * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what did not become ready within ${seconds}s (see $RUN_DIR/*/log)"
}

clickhouse_ready() {
  [ "$(curl -sf --max-time 2 "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/ping")" = "Ok." ]
}

start_clickhouse() {
  if clickhouse_ready; then log "ClickHouse already answering on :$CLICKHOUSE_HTTP_PORT"; return; fi
  local dir="$RUN_DIR/clickhouse"
  mkdir -p "$dir"/{data,tmp,user_files,format_schemas,log}
  # <yandex> is the root element 18.16 requires; current releases still accept it.
  cat >"$dir/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$dir/log/clickhouse-server.log</log><errorlog>$dir/log/clickhouse-server.err.log</errorlog><size>50M</size><count>2</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$CLICKHOUSE_HTTP_PORT</http_port>
  <tcp_port>$CLICKHOUSE_TCP_PORT</tcp_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
</yandex>
XML
  cat >"$dir/users.xml" <<XML
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
  log "starting ClickHouse on 127.0.0.1:$CLICKHOUSE_HTTP_PORT (data in $dir)"
  # setsid + closed stdio: the server must not hold the caller's terminal or pipes.
  setsid clickhouse-server --config-file="$dir/config.xml" </dev/null >"$dir/log/stdout.log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until "ClickHouse" 60 clickhouse_ready
}

ferretdb_ready() { port_open "$FERRETDB_PORT"; }

start_ferretdb() {
  if ferretdb_ready; then log "FerretDB already answering on :$FERRETDB_PORT"; return; fi
  # FerretDB exits at once when its metrics port is taken (by another stack's
  # FerretDB, say); name that instead of waiting for a server that never comes.
  if port_open "$FERRETDB_DEBUG_PORT"; then
    die "port $FERRETDB_DEBUG_PORT (FerretDB's metrics) is in use: set FGP_FERRETDB_DEBUG_PORT to a free port"
  fi
  local dir="$RUN_DIR/ferretdb"
  mkdir -p "$dir"/{data,state,log}
  log "starting FerretDB $FERRETDB_VERSION (SQLite backend) on 127.0.0.1:$FERRETDB_PORT"
  setsid "$TOOLS_DIR/bin/ferretdb" --handler=sqlite --sqlite-url="file:$dir/data/" \
    --state-dir="$dir/state" --listen-addr="127.0.0.1:$FERRETDB_PORT" --debug-addr="127.0.0.1:$FERRETDB_DEBUG_PORT" \
    --telemetry=disable --log-level=warn </dev/null >"$dir/log/ferretdb.log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until "FerretDB" 30 ferretdb_ready
}

start_services() {
  mkdir -p "$RUN_DIR"
  start_clickhouse
  start_ferretdb
  log "ClickHouse $(curl -sf --max-time 5 "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/?query=SELECT%20version()") and FerretDB $FERRETDB_VERSION are up"
}

# Starts the services for the calling script; stops them when it exits only if
# it started them (a running demo stack is reused and left running).
SERVICES_STARTED_HERE=0
start_services_for_this_script() {
  if ! clickhouse_ready || ! ferretdb_ready; then SERVICES_STARTED_HERE=1; fi
  start_services
  if [ "$SERVICES_STARTED_HERE" -eq 1 ]; then trap stop_services EXIT; fi
}

# A run of the tests or benches: its databases are named with this id (see
# tests/support's unique_name) and dropped when it ends, unless
# FGP_KEEP_TEST_DATABASES=1 keeps them for a look after a failure.
begin_test_run() {
  FGP_TEST_RUN_ID="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
  export FGP_TEST_RUN_ID
}
# Left in servers that keep running (the demo stack's are reused), every run
# added some eighty ClickHouse databases, whose tables' background work costs
# CPU while idle and skews the benches, and some ninety FerretDB ones.
# Arguments: cargo's profile flags of the run (`--release` for the benches), so
# that the dropping example builds on what the run built.
end_test_run() {
  [ "${FGP_KEEP_TEST_DATABASES:-0}" != 1 ] || return 0
  local dropped
  if dropped="$(cargo run --quiet "$@" --example drop_test_run_databases -- \
    "$FGP_TEST_CLICKHOUSE_URL" "$FGP_TEST_MONGO_URI" "$FGP_TEST_RUN_ID")"; then
    log "dropped the databases of test run $FGP_TEST_RUN_ID: $dropped"
  else
    log "warning: could not drop the databases of test run $FGP_TEST_RUN_ID"
  fi
}

# Stops only what this checkout started (pid files under .run/).
stop_services() {
  local pidfile
  for pidfile in "$RUN_DIR"/*/pid; do
    [ -f "$pidfile" ] || continue
    local pid i
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}
