#!/usr/bin/env bash
# Makes sure the PostgreSQL, Redis and RabbitMQ named by PAYONCE_DATABASE_URL, PAYONCE_REDIS_URL
# and PAYONCE_AMQP_URL answer, and that the Postgres role and both databases (<db>, <db>_test)
# exist. A local server that does not answer is started: with docker compose when a Docker
# engine runs, else from the OS packages with its data in .data/ (PAYONCE_DATA_DIR).
# Servers that already answer are used as they are, never restarted or reconfigured.
# PAYONCE_SERVICES_VIA=packages uses the OS packages even when a Docker engine runs: the
# fault-injection tests (tests/private.py) signal the servers' own processes.
# PAYONCE_RABBITMQ_MANAGEMENT=0 starts RabbitMQ without its management UI and Prometheus
# endpoint (on by default; a running local broker gets both enabled online when root).
#
#   bash ops/services.sh                    # bring up / check all three
#   bash ops/services.sh up redis           # only the named ones (postgres, redis, rabbitmq)
#   bash ops/services.sh stop [SERVICE...]  # stop only what this script started from .data/ or docker
#   bash ops/services.sh tools prometheus chromium  # install tools some tests need
#   bash ops/services.sh rabbitmqctl ARGS   # rabbitmqctl (or rabbitmq-diagnostics) against the
#                                           # node this script starts for PAYONCE_AMQP_URL
#
# SC2317: with the final exit, shellcheck takes the functions called by a computed name
# (up_$svc, start_$svc) for unreachable (koalaman/shellcheck#3183).
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath -m "${PAYONCE_DATA_DIR:-$ROOT/.data}")
TIMEOUT=60 # seconds per server; RabbitMQ's first boot takes ~15 s

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }
is_root() { [[ $(id -u) == 0 ]]; }
is_local() { [[ $1 == localhost || $1 == ::1 || $1 == 127.* ]]; }
# shellcheck disable=SC2016
tcp_up() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }
bind_addr() { if [[ $1 == localhost ]]; then echo 127.0.0.1; else echo "$1"; fi; }
show_log() { if [[ -f $1 ]]; then tail -n 20 "$1" | sed 's/^/    /' >&2; fi; }

# as_user USER CMD...: run CMD as USER when root and USER exists (initdb refuses root; the
# Debian RabbitMQ packages expect their own user and its Erlang cookie), else as ourselves.
as_user() {
  local user=$1; shift
  if is_root && id "$user" >/dev/null 2>&1; then (cd / && runuser -u "$user" -- "$@"); else "$@"; fi
}
runas_prefix() { # the same, as a command prefix, for a command that must run in the background
  if is_root && id "$1" >/dev/null 2>&1; then echo "runuser -u $1 --"; fi
}
own() { # own USER PATH...: hand PATHs to USER when it is the one that will write them
  local user=$1; shift
  if is_root && id "$user" >/dev/null 2>&1; then
    chown -R "$user:" "$@" || die "could not hand $* to user $user"
    as_user "$user" test -w "$1" ||
      die "user $user cannot write $1; set PAYONCE_DATA_DIR to a folder it can reach (e.g. /var/tmp/payonce)"
  fi
}

SERVICES=()
pick_services() { # pick_services [NAME...]: the services to act on, all three when none is named
  local svc
  (($#)) || set -- postgres redis rabbitmq
  for svc; do
    case $svc in
      postgres | redis | rabbitmq) ;;
      *) die "unknown service '$svc' (expected postgres, redis or rabbitmq)" ;;
    esac
  done
  SERVICES=("$@")
}
picked() { local svc; for svc in "${SERVICES[@]}"; do [[ $svc == "$1" ]] && return 0; done; return 1; }

case ${PAYONCE_SERVICES_VIA:=auto} in
  auto | packages) ;;
  *) die "PAYONCE_SERVICES_VIA must be auto or packages, not '$PAYONCE_SERVICES_VIA'" ;;
esac
case ${PAYONCE_RABBITMQ_MANAGEMENT:=1} in
  0 | 1) ;;
  *) die "PAYONCE_RABBITMQ_MANAGEMENT must be 1 or 0, not '$PAYONCE_RABBITMQ_MANAGEMENT'" ;;
esac
via_docker() { # start missing servers with docker compose, rather than from the OS packages?
  [[ $PAYONCE_SERVICES_VIA == auto ]] && command -v docker >/dev/null && docker info >/dev/null 2>&1
}

parse_urls() {
  local assignments
  assignments=$(python3 - \
    "${PAYONCE_DATABASE_URL:-postgresql://payonce:payonce@127.0.0.1:5432/payonce}" \
    "${PAYONCE_REDIS_URL:-redis://127.0.0.1:6379/0}" \
    "${PAYONCE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}" <<'PY'
import shlex, sys
from urllib.parse import unquote, urlsplit

for prefix, url, port in zip(("PG", "REDIS", "AMQP"), sys.argv[1:], (5432, 6379, 5672)):
    u = urlsplit(url)
    fields = {"HOST": u.hostname or "127.0.0.1", "PORT": u.port or port,
              "USER": unquote(u.username or ""), "PASS": unquote(u.password or ""),
              "PATH": unquote(u.path.lstrip("/"))}
    for key, value in fields.items():
        print(f"{prefix}_{key}={shlex.quote(str(value))}")
PY
  ) || die "could not parse the PAYONCE_*_URL variables"
  eval "$assignments"
  PG_USER=${PG_USER:-postgres}
  PG_DB=${PG_PATH:-$PG_USER}
  PG_TEST_DB=${PG_DB}_test
}

pg_bindir() { # the newest server install (Debian keeps initdb out of PATH)
  local dir
  dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  [[ -x $dir/initdb ]] || { command -v initdb >/dev/null && dir=$(dirname "$(command -v initdb)"); } ||
    return 1
  echo "$dir"
}
# Unix sockets paths are limited to 107 bytes; /tmp is the fallback for deep checkouts.
pg_sockdir() { if ((${#DATA} < 80)); then echo "$DATA/run"; else echo /tmp; fi; }
rabbitmq_bin() { # the real scripts, not Debian's wrappers (they drop arguments when not root)
  if [[ -x /usr/lib/rabbitmq/bin/$1 ]]; then echo "/usr/lib/rabbitmq/bin/$1"; else command -v "$1"; fi
}
# One node per AMQP port, so a private broker never shares a name (or mnesia) with another.
rabbitmq_node() { echo "payonce-$AMQP_PORT@localhost"; }

up_postgres() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2
  else
    tcp_up "$PG_HOST" "$PG_PORT"
  fi
}
up_redis() { tcp_up "$REDIS_HOST" "$REDIS_PORT"; }
up_rabbitmq() { tcp_up "$AMQP_HOST" "$AMQP_PORT"; }
host_of() {
  case $1 in postgres) echo "$PG_HOST" ;; redis) echo "$REDIS_HOST" ;; rabbitmq) echo "$AMQP_HOST" ;; esac
}
port_of() {
  case $1 in postgres) echo "$PG_PORT" ;; redis) echo "$REDIS_PORT" ;; rabbitmq) echo "$AMQP_PORT" ;; esac
}
addr_of() { echo "$(host_of "$1"):$(port_of "$1")"; }

wait_until() { # wait_until WHAT LOG CMD...: poll CMD for up to $TIMEOUT s
  local what=$1 log=$2 deadline=$((SECONDS + TIMEOUT)); shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then
      printf 'services: error: %s not ready after %s s; log: %s\n' "$what" "$TIMEOUT" "$log" >&2
      show_log "$log"
      exit 1
    fi
    sleep 0.5
  done
}

install_packages() {
  local pkgs=() svc
  for svc in "$@"; do
    case $svc in
      postgres) [[ -n $(pg_bindir) ]] || pkgs+=(postgresql) ;;
      redis) command -v redis-server >/dev/null || pkgs+=(redis-server) ;;
      rabbitmq) [[ -n $(rabbitmq_bin rabbitmq-server) ]] || pkgs+=(rabbitmq-server) ;;
      psql) command -v psql >/dev/null || pkgs+=(postgresql-client) ;;
    esac
  done
  ((${#pkgs[@]})) || return 1
  command -v apt-get >/dev/null ||
    die "missing ${pkgs[*]}: install them with your package manager, or start a Docker engine"
  is_root || die "missing ${pkgs[*]}; run: sudo apt-get update && sudo apt-get install -y ${pkgs[*]}"
  say "installing ${pkgs[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q "${pkgs[@]}"
}

start_docker() {
  docker compose version >/dev/null 2>&1 || die "a Docker engine runs but 'docker compose' is missing"
  say "docker: docker compose up -d --wait $*"
  PAYONCE_PG_PORT=$PG_PORT PAYONCE_REDIS_PORT=$REDIS_PORT PAYONCE_AMQP_PORT=$AMQP_PORT \
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait "$@"
  mkdir -p "$DATA" && printf '%s\n' "$@" >>"$DATA/docker-services"
}

start_postgres() {
  local bin pgdata=$DATA/postgres sock log=$DATA/log/postgres.log
  bin=$(pg_bindir) || die "PostgreSQL server binaries not found"
  sock=$(pg_sockdir)
  mkdir -p "$pgdata" "$sock" "$DATA/log" && touch "$log" && chmod 700 "$pgdata"
  own postgres "$pgdata" "$log"
  [[ $sock == /tmp ]] || own postgres "$sock"
  if as_user postgres "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    die "the cluster in $pgdata runs, but not on port $PG_PORT; run: make stop-services"
  fi
  if [[ ! -s $pgdata/PG_VERSION ]]; then
    say "postgres: initdb $pgdata"
    as_user postgres "$bin/initdb" -D "$pgdata" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=scram-sha-256 >>"$log" 2>&1 ||
      { show_log "$log"; die "initdb failed; log: $log"; }
  fi
  say "postgres: starting on $(bind_addr "$PG_HOST"):$PG_PORT (data $pgdata, log $log)"
  as_user postgres "$bin/pg_ctl" -D "$pgdata" -l "$log" -w -t "$TIMEOUT" \
    -o "-p $PG_PORT -k '$sock' -h $(bind_addr "$PG_HOST")" start >/dev/null ||
    { show_log "$log"; die "postgres did not start; log: $log"; }
}

start_redis() {
  local log=$DATA/log/redis.log
  if alive "$DATA/redis/redis.pid" redis-server; then
    die "a Redis from $DATA/redis runs, but not on $REDIS_HOST:$REDIS_PORT; run: make stop-services"
  fi
  mkdir -p "$DATA/redis" "$DATA/log"
  say "redis: starting on $(bind_addr "$REDIS_HOST"):$REDIS_PORT (log $log)"
  # No persistence: Redis only holds caches and short-lived markers; Postgres is the authority.
  redis-server --daemonize yes --bind "$(bind_addr "$REDIS_HOST")" --port "$REDIS_PORT" \
    --dir "$DATA/redis" --logfile "$log" --pidfile "$DATA/redis/redis.pid" \
    --save "" --appendonly no >/dev/null
  wait_until redis "$log" up_redis
}

start_rabbitmq() {
  local base=$DATA/rabbitmq logs=$DATA/log/rabbitmq node
  local dist=$((AMQP_PORT + 20000)) mgmt=15672 prom=15692 server ports
  ((dist <= 65535)) || dist=$((AMQP_PORT - 10000))
  node=$(rabbitmq_node)
  server=$(rabbitmq_bin rabbitmq-server) || die "rabbitmq-server not found"
  if alive "$base/rabbitmq.pid" beam.smp; then
    die "a RabbitMQ node from $base runs, but not on $AMQP_HOST:$AMQP_PORT; run: make stop-services"
  fi
  ! tcp_up 127.0.0.1 "$dist" ||
    die "port $dist (Erlang distribution for $node) is in use; pick another AMQP port"
  mkdir -p "$base" "$logs"
  rm -f "$base/rabbitmq.pid"
  printf 'log.console = false\n' >"$base/rabbitmq.conf"
  if ((PAYONCE_RABBITMQ_MANAGEMENT)); then
    while tcp_up 127.0.0.1 "$mgmt"; do # another broker's management UI may hold 15672
      ((++mgmt < 15772)) || die "no free port for the RabbitMQ management UI in 15672-15771"
    done
    while tcp_up 127.0.0.1 "$prom"; do # and its Prometheus endpoint 15692
      ((++prom < 15792)) || die "no free port for RabbitMQ's Prometheus endpoint in 15692-15791"
    done
    printf '[rabbitmq_management,rabbitmq_prometheus].\n' >"$base/enabled_plugins"
    printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' "$mgmt" >>"$base/rabbitmq.conf"
    printf 'prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = %s\n' "$prom" >>"$base/rabbitmq.conf"
    ports="$AMQP_PORT, $dist, $mgmt and $prom"
    say "rabbitmq: starting node $node on $(bind_addr "$AMQP_HOST"):$AMQP_PORT," \
      "management UI on http://127.0.0.1:$mgmt/ (log in as the AMQP URL's user, $AMQP_USER)," \
      "Prometheus metrics on 127.0.0.1:$prom (log $logs/)"
  else
    # Without the UI a stop also takes seconds less: the plugin winds its statistics down first.
    printf '[].\n' >"$base/enabled_plugins"
    ports="$AMQP_PORT and $dist"
    say "rabbitmq: starting node $node on $(bind_addr "$AMQP_HOST"):$AMQP_PORT, no management UI" \
      "(log $logs/)"
  fi
  own rabbitmq "$base" "$logs"
  # Not -detached: a node that fails to boot then says why in startup.log, and exits at once.
  # setsid keeps it out of the terminal's process group, so Ctrl-C on `make run` spares it.
  # RABBITMQ_CONF_ENV_FILE and the advanced config point into .data so /etc/rabbitmq is not read.
  # shellcheck disable=SC2046
  (cd "$base" && exec setsid $(runas_prefix rabbitmq) env \
    RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS="$(bind_addr "$AMQP_HOST")" \
    RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$logs" RABBITMQ_PID_FILE="$base/rabbitmq.pid" \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$base/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 "$server") >"$logs/startup.log" 2>&1 </dev/null &
  RABBIT_STARTER=$!
  wait_until rabbitmq "$logs/$node.log" rabbitmq_booted "$logs/startup.log" \
    "node $node, ports $ports"
}
rabbitmq_booted() {
  up_rabbitmq && return 0
  kill -0 "$RABBIT_STARTER" 2>/dev/null && return 1
  show_log "$1"
  die "rabbitmq exited while booting ($2); logs: $(dirname "$1")/"
}

# Superuser connections to try, in order; the first that may create roles and databases wins.
su_psql() {
  case $SU_WAY in
    tcp) env -u PGPASSWORD psql -X -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@" ;;
    socket) as_user postgres psql -X -w -p "$PG_PORT" -d postgres "$@" ;;
    data) env -u PGPASSWORD psql -X -w -h "$(pg_sockdir)" -p "$PG_PORT" -U postgres -d postgres "$@" ;;
    url) PGPASSWORD=$PG_PASS psql -X -w -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres "$@" ;;
  esac
}
pg_login() {
  PGPASSWORD=$PG_PASS psql -X -w -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$1" \
    -c 'select 1' >/dev/null 2>&1
}

ensure_pg_role_and_dbs() {
  export PGCONNECT_TIMEOUT=5
  if ! command -v psql >/dev/null; then
    say "postgres: psql not found; role and databases are left to the app"
    return
  fi
  if pg_login "$PG_DB" && pg_login "$PG_TEST_DB"; then
    say "postgres: role $PG_USER reaches databases $PG_DB and $PG_TEST_DB"
    return
  fi
  local ways=(tcp) way missing
  is_local "$PG_HOST" && is_root && ways+=(socket)
  [[ -S $(pg_sockdir)/.s.PGSQL.$PG_PORT ]] && ways+=(data)
  ways+=(url)
  SU_WAY=
  for way in "${ways[@]}"; do
    if [[ $(SU_WAY=$way su_psql -tA -c \
      'select rolsuper or (rolcreaterole and rolcreatedb) from pg_roles where rolname = current_user' \
      2>/dev/null) == t ]]; then
      SU_WAY=$way
      break
    fi
  done
  [[ -n $SU_WAY ]] || die "role $PG_USER cannot reach $PG_DB/$PG_TEST_DB, and no superuser" \
    "connection to $PG_HOST:$PG_PORT works to create them (tried: ${ways[*]})"
  local vars=(-v ON_ERROR_STOP=1 -v user="$PG_USER" -v pass="$PG_PASS" -v db="$PG_DB" -v testdb="$PG_TEST_DB")
  missing=$(su_psql -tA "${vars[@]}" <<'SQL'
SELECT string_agg(what, ', ') FROM (
  SELECT 'role ' || :'user' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user')
  UNION ALL
  SELECT 'database ' || d FROM unnest(ARRAY[:'db', :'testdb']) AS d
   WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d)) AS m (what);
SQL
  )
  if [[ -n $missing ]]; then
    say "postgres: creating $missing (as superuser, via $SU_WAY)"
    su_psql -q "${vars[@]}" >/dev/null <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'pass')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', d, :'user') FROM unnest(ARRAY[:'db', :'testdb']) AS d
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = d) \gexec
SQL
  fi
  local db
  for db in "$PG_DB" "$PG_TEST_DB"; do
    pg_login "$db" || die "role $PG_USER exists but cannot log in to $db at $PG_HOST:$PG_PORT" \
      "with the URL's password (different password, or pg_hba.conf refuses it)"
  done
  say "postgres: role $PG_USER reaches databases $PG_DB and $PG_TEST_DB"
}

# A local broker that answers but was not started here: make sure the management UI and the
# Prometheus endpoint are on, without a restart (rabbitmq-plugins --online), when we may manage
# it (root, its CLI at hand); otherwise say how, and go on.
ensure_rabbitmq_plugins() {
  ((PAYONCE_RABBITMQ_MANAGEMENT)) || return 0
  is_local "$AMQP_HOST" || return 0
  alive "$DATA/rabbitmq/rabbitmq.pid" beam.smp && return 0 # ours: started with both
  local tool enabled
  # The OS package's wrapper, not the real script: the system's broker runs as the rabbitmq
  # user, and the wrapper presents that user's Erlang cookie.
  tool=$(command -v rabbitmq-plugins) || tool=
  if ! is_root || [[ -z $tool ]]; then
    say "rabbitmq: to see the management UI and Prometheus metrics, run:" \
      "sudo rabbitmq-plugins enable --online rabbitmq_management rabbitmq_prometheus"
    return 0
  fi
  if ! enabled=$(timeout 30 "$tool" list -e -m -q 2>/dev/null); then
    say "rabbitmq: could not ask the running node for its plugins (another node name or" \
      "Erlang cookie?); enable rabbitmq_management and rabbitmq_prometheus on it by hand"
    return 0
  fi
  if ! grep -qx rabbitmq_management <<<"$enabled" || ! grep -qx rabbitmq_prometheus <<<"$enabled"; then
    say "rabbitmq: enabling the management UI and Prometheus metrics on the running node"
    timeout 60 "$tool" enable rabbitmq_management rabbitmq_prometheus >/dev/null ||
      { say "rabbitmq: enabling the plugins failed; the broker works without them"; return 0; }
  fi
  say "rabbitmq: management UI on http://127.0.0.1:15672/ (log in as the AMQP URL's user," \
    "$AMQP_USER), Prometheus metrics on http://127.0.0.1:15692/metrics"
}

# Tools some tests need beside the servers: Prometheus (promtool checks the alert rules; the
# server scrapes a real stack in a test) and Chromium (renders the API reference page, headless).
# Installed from the OS packages, as the servers are.
cmd_tools() {
  local tool missing=()
  for tool in "$@"; do
    case $tool in
      prometheus) command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus) ;;
      chromium) command -v chromium >/dev/null || missing+=(chromium) ;;
      *) die "unknown tool '$tool' (expected prometheus or chromium)" ;;
    esac
  done
  ((${#missing[@]})) || { say "tools: $* present"; return 0; }
  if ! command -v apt-get >/dev/null || ! is_root; then
    say "tools: ${missing[*]} missing; the tests that need it are skipped. Install it with:" \
      "sudo apt-get install -y --no-install-recommends ${missing[*]}"
    return 0
  fi
  say "tools: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
}

cmd_up() {
  pick_services "$@"
  parse_urls
  local svc missing=() ready=
  for svc in "${SERVICES[@]}"; do
    if "up_$svc"; then
      say "$svc: $(addr_of "$svc") answers"
    else
      is_local "$(host_of "$svc")" ||
        die "$svc at $(addr_of "$svc") does not answer (not a local address, so not started here)"
      say "$svc: $(addr_of "$svc") does not answer"
      missing+=("$svc")
    fi
  done
  if ((${#missing[@]})); then
    if via_docker; then
      start_docker "${missing[@]}"
    else
      if install_packages "${missing[@]}"; then
        # Package scripts may have started the system's own servers on the default ports.
        local still=()
        for svc in "${missing[@]}"; do "up_$svc" || still+=("$svc"); done
        missing=("${still[@]}")
      fi
      for svc in "${missing[@]}"; do "start_$svc"; done
    fi
  fi
  if picked rabbitmq; then ensure_rabbitmq_plugins; fi
  if picked postgres; then
    if is_local "$PG_HOST" && ! command -v psql >/dev/null && is_root && command -v apt-get >/dev/null; then
      install_packages psql
    fi
    ensure_pg_role_and_dbs
  fi
  for svc in "${SERVICES[@]}"; do ready+="${ready:+, }$svc $(addr_of "$svc")"; done
  say "ready: $ready"
}

alive() { # alive PIDFILE COMM: the pid file names a live process of that command
  local pid
  [[ -f $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] &&
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] && running "$pid"
}
# A server that exited stays a zombie until init reaps it, which some inits do only every few
# seconds; it holds no port and no file, so it counts as gone.
running() { local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) && [[ ${stat##*) } != Z* ]]; }
stop_pid() { # stop_pid NAME PIDFILE COMM: SIGTERM a server we started, if it still is that server
  alive "$2" "$3" || { rm -f "$2"; return 1; }
  local pid deadline=$((SECONDS + TIMEOUT))
  pid=$(<"$2")
  say "$1: stopping pid $pid"
  kill -TERM "$pid"
  while running "$pid"; do
    ((SECONDS < deadline)) || die "$1 (pid $pid) still runs after $TIMEOUT s"
    sleep 0.5
  done
  rm -f "$2"
}

cmd_stop() {
  pick_services "$@"
  local stopped=0 bin
  if picked postgres && [[ -f $DATA/postgres/postmaster.pid ]] && bin=$(pg_bindir) &&
    as_user postgres "$bin/pg_ctl" -D "$DATA/postgres" status >/dev/null 2>&1; then
    say "postgres: stopping the cluster in $DATA/postgres"
    as_user postgres "$bin/pg_ctl" -D "$DATA/postgres" -w -t "$TIMEOUT" -m fast stop >/dev/null
    stopped=1
  fi
  if picked redis; then stop_pid redis "$DATA/redis/redis.pid" redis-server && stopped=1; fi
  if picked rabbitmq; then stop_pid rabbitmq "$DATA/rabbitmq/rabbitmq.pid" beam.smp && stopped=1; fi
  if [[ -s $DATA/docker-services ]] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    local svc svcs=() rest=()
    while read -r svc; do
      if picked "$svc"; then svcs+=("$svc"); else rest+=("$svc"); fi
    done < <(sort -u "$DATA/docker-services")
    if ((${#svcs[@]})); then
      say "docker: docker compose stop ${svcs[*]}"
      docker compose -f "$ROOT/docker-compose.yml" stop "${svcs[@]}"
      stopped=1
    fi
    if ((${#rest[@]})); then printf '%s\n' "${rest[@]}" >"$DATA/docker-services"; else rm -f "$DATA/docker-services"; fi
  fi
  ((stopped)) || say "nothing started from $DATA runs"
}

cmd_rabbitmq_cli() { # cmd_rabbitmq_cli TOOL ARGS...
  local tool
  parse_urls
  tool=$(rabbitmq_bin "$1") || die "$1 not found"
  shift
  # As the rabbitmq user when root, as the server runs: the CLI must present its Erlang cookie.
  as_user rabbitmq "$tool" -n "$(rabbitmq_node)" "$@"
}

main() {
  local cmd=${1:-up}
  (($# == 0)) || shift
  case $cmd in
    up) cmd_up "$@" ;;
    tools) cmd_tools "$@" ;;
    stop) cmd_stop "$@" ;;
    rabbitmqctl | rabbitmq-diagnostics) cmd_rabbitmq_cli "$cmd" "$@" ;;
    *) die "usage: $0 [up|stop [postgres|redis|rabbitmq...]] | tools prometheus|chromium... | rabbitmqctl|rabbitmq-diagnostics ARGS..." ;;
  esac
}
# One line, read whole before it runs, that ends in exit: bash reads a script as it runs it, and
# this one can wait a minute for a server while the file is edited or checked out anew.
main "$@"; exit
