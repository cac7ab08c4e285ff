#!/bin/sh
# xaiserve-entrypoint: the one environment contract of every deployment (container images,
# Kubernetes, KServe, docker compose, systemd). It maps XAISERVE_* variables to
# `xaiserve serve` flags, checks them first (one line on stderr, exit 2), then execs the server
# so that it is the process that gets SIGTERM and shuts down gracefully.
#
#   xaiserve-entrypoint [EXTRA SERVE FLAGS...]   serve (extra flags are appended as given)
#   xaiserve-entrypoint health                   gRPC health check of the local server
#   xaiserve-entrypoint COMMAND [ARGS...]        run anything else as is (e.g. xaiserve export)
#
# Variables (unset or empty means "not given"):
#   XAISERVE_REPOSITORY    model repository directory      (default /models)
#   XAISERVE_PORT          gRPC port                       (default 9000)
#   XAISERVE_HOST          address to bind                 (server default 0.0.0.0)
#   XAISERVE_CONFIG        serve.yaml                      (optional)
#   XAISERVE_DEVICE        CPU, GPU, NPU, AUTO, HETERO:... (optional)
#   XAISERVE_WORKERS       gRPC worker threads             (optional)
#   XAISERVE_LOG_LEVEL     DEBUG, INFO, WARNING, ERROR     (default INFO)
#   XAISERVE_LOG_FORMAT    text or json (one object a line) (default text)
#   XAISERVE_METRICS_PORT  Prometheus metrics port         (optional)
#   XAISERVE_REST_PORT     REST port: KServe v2 over HTTP  (optional)
#   XAISERVE_TOKEN_FILE    file with the bearer token clients must send (optional; the server
#                          also reads XAISERVE_TOKEN itself); health checks need none
#   XAISERVE_TLS_CERT, XAISERVE_TLS_KEY  PEM server certificate and key (both or neither)
#   XAISERVE_TLS_CLIENT_CA PEM CA that client certificates must chain to (needs TLS)
#   XAISERVE_HEALTH_TLS_CA           CA the health check trusts (default XAISERVE_TLS_CERT)
#   XAISERVE_HEALTH_TLS_CERT/_KEY    client certificate of the health check under mTLS
#   XAISERVE_HEALTH_TLS_SERVER_NAME  name in the server certificate (default localhost)
#   XAISERVE_BIN           the xaiserve command            (default: xaiserve on PATH)
# Under systemd, files only root may read (the TLS key, the token) come as credentials
# (LoadCredential=token:/etc/xaiserve/token in a drop-in): $CREDENTIALS_DIRECTORY/token,
# tls-cert, tls-key and tls-client-ca are used where the variable for them is unset.
set -eu

XAISERVE_BIN=${XAISERVE_BIN:-xaiserve}

fail() {
    echo "xaiserve-entrypoint: error: $*" >&2
    exit 2
}

check_port() {  # NAME VALUE
    case $2 in
        '' | *[!0-9]*) fail "$1='$2' is not a port number; set it to 1..65535" ;;
    esac
    if [ "${#2}" -gt 5 ] || [ "$2" -lt 1 ] || [ "$2" -gt 65535 ]; then
        fail "$1=$2 is out of range; set it to 1..65535"
    fi
}

check_count() {  # NAME VALUE
    case $2 in
        '' | 0 | *[!0-9]*) fail "$1='$2' is not a positive whole number" ;;
    esac
}

check_file() {  # NAME PATH
    [ -f "$2" ] && [ -r "$2" ] || fail "$1=$2: no readable file there; mount it or unset $1"
}

case ${1:-} in
    '' | -* | health) ;;  # serve (with any extra flags) or the health check
    *) exec "$@" ;;       # another command: run it as given, whatever the variables say
esac

port=${XAISERVE_PORT:-9000}
check_port XAISERVE_PORT "$port"

credential() {  # NAME: systemd's credential file of that name, if there is one
    if [ -n "${CREDENTIALS_DIRECTORY:-}" ] && [ -f "$CREDENTIALS_DIRECTORY/$1" ]; then
        echo "$CREDENTIALS_DIRECTORY/$1"
    fi
}
tls_cert=${XAISERVE_TLS_CERT:-$(credential tls-cert)}
tls_key=${XAISERVE_TLS_KEY:-$(credential tls-key)}
tls_client_ca=${XAISERVE_TLS_CLIENT_CA:-$(credential tls-client-ca)}
token_file=${XAISERVE_TOKEN_FILE:-$(credential token)}
if [ -n "$tls_cert" ] && [ -z "$tls_key" ]; then
    fail "XAISERVE_TLS_CERT is set but XAISERVE_TLS_KEY is not; set both or neither"
fi
if [ -z "$tls_cert" ] && [ -n "$tls_key" ]; then
    fail "XAISERVE_TLS_KEY is set but XAISERVE_TLS_CERT is not; set both or neither"
fi
if [ -n "$tls_client_ca" ] && [ -z "$tls_cert" ]; then
    fail "XAISERVE_TLS_CLIENT_CA needs TLS; set XAISERVE_TLS_CERT and XAISERVE_TLS_KEY too"
fi

if [ "${1:-}" = health ]; then
    shift
    # the address the server binds: loopback when it binds every address
    case ${XAISERVE_HOST:-} in
        "" | 0.0.0.0 | :: | "[::]") health_host=127.0.0.1 ;;
        *:*) health_host="[${XAISERVE_HOST#[}" && health_host="${health_host%]}]" ;;
        *) health_host=$XAISERVE_HOST ;;
    esac
    set -- --server "$health_host:$port" "$@"
    if [ -n "$tls_cert" ]; then
        ca=${XAISERVE_HEALTH_TLS_CA:-$tls_cert}
        check_file XAISERVE_HEALTH_TLS_CA "$ca"
        set -- "$@" --tls-ca "$ca" \
            --tls-server-name "${XAISERVE_HEALTH_TLS_SERVER_NAME:-localhost}"
        if [ -n "$tls_client_ca" ]; then
            [ -n "${XAISERVE_HEALTH_TLS_CERT:-}" ] && [ -n "${XAISERVE_HEALTH_TLS_KEY:-}" ] ||
                fail "XAISERVE_TLS_CLIENT_CA asks clients for certificates; set" \
                    "XAISERVE_HEALTH_TLS_CERT and XAISERVE_HEALTH_TLS_KEY for the health check"
            set -- "$@" --tls-cert "$XAISERVE_HEALTH_TLS_CERT" --tls-key "$XAISERVE_HEALTH_TLS_KEY"
        fi
    fi
    exec "$XAISERVE_BIN" health "$@"
fi

repository=${XAISERVE_REPOSITORY:-/models}
[ -d "$repository" ] && [ -r "$repository" ] && [ -x "$repository" ] ||
    fail "XAISERVE_REPOSITORY=$repository is not a readable directory; mount the model" \
        "repository there or point XAISERVE_REPOSITORY at it"

# Build `serve --repository R --port P [options]`, then move the extra flags given on the
# command line behind them, so that an extra flag wins over the same setting from a variable.
extra=$#
set -- "$@" serve --repository "$repository" --port "$port"
if [ -n "${XAISERVE_HOST:-}" ]; then set -- "$@" --host "$XAISERVE_HOST"; fi
if [ -n "${XAISERVE_CONFIG:-}" ]; then
    check_file XAISERVE_CONFIG "$XAISERVE_CONFIG"
    set -- "$@" --config "$XAISERVE_CONFIG"
fi
if [ -n "${XAISERVE_DEVICE:-}" ]; then set -- "$@" --device "$XAISERVE_DEVICE"; fi
if [ -n "${XAISERVE_WORKERS:-}" ]; then
    check_count XAISERVE_WORKERS "$XAISERVE_WORKERS"
    set -- "$@" --workers "$XAISERVE_WORKERS"
fi
level=${XAISERVE_LOG_LEVEL:-INFO}
case $level in
    DEBUG | INFO | WARNING | ERROR | CRITICAL | debug | info | warning | error | critical) ;;
    *) fail "XAISERVE_LOG_LEVEL='$level' is not a level; use DEBUG, INFO, WARNING or ERROR" ;;
esac
set -- "$@" --log-level "$level"
log_format=${XAISERVE_LOG_FORMAT:-text}
case $log_format in
    text | json) ;;
    *) fail "XAISERVE_LOG_FORMAT='$log_format' is not a format; use text or json" ;;
esac
set -- "$@" --log-format "$log_format"
if [ -n "$token_file" ]; then
    check_file XAISERVE_TOKEN_FILE "$token_file"
    set -- "$@" --token-file "$token_file"
fi
if [ -n "${XAISERVE_METRICS_PORT:-}" ]; then
    check_port XAISERVE_METRICS_PORT "$XAISERVE_METRICS_PORT"
    [ "$XAISERVE_METRICS_PORT" != "$port" ] ||
        fail "XAISERVE_METRICS_PORT=$XAISERVE_METRICS_PORT is the gRPC port too; pick another"
    set -- "$@" --metrics-port "$XAISERVE_METRICS_PORT"
fi
if [ -n "${XAISERVE_REST_PORT:-}" ]; then
    check_port XAISERVE_REST_PORT "$XAISERVE_REST_PORT"
    [ "$XAISERVE_REST_PORT" != "$port" ] ||
        fail "XAISERVE_REST_PORT=$XAISERVE_REST_PORT is the gRPC port too; pick another"
    [ "$XAISERVE_REST_PORT" != "${XAISERVE_METRICS_PORT:-}" ] ||
        fail "XAISERVE_REST_PORT=$XAISERVE_REST_PORT is the metrics port too; pick another"
    set -- "$@" --rest-port "$XAISERVE_REST_PORT"
fi
if [ -n "$tls_cert" ]; then
    check_file XAISERVE_TLS_CERT "$tls_cert"
    check_file XAISERVE_TLS_KEY "$tls_key"
    set -- "$@" --tls-cert "$tls_cert" --tls-key "$tls_key"
fi
if [ -n "$tls_client_ca" ]; then
    check_file XAISERVE_TLS_CLIENT_CA "$tls_client_ca"
    set -- "$@" --tls-client-ca "$tls_client_ca"
fi
while [ "$extra" -gt 0 ]; do
    set -- "$@" "$1"
    shift
    extra=$((extra - 1))
done

exec "$XAISERVE_BIN" "$@"
