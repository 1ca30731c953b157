#!/usr/bin/env bash
# Benchmark ksz-proxy on loopback (see bench/README.md): `make bench`, or
# `bash bench/run.sh [--quick] [...]` with the project's virtual environment built.
#
# Needs nginx and wrk, and valgrind for the instruction counts (--instructions...). When one is
# missing and this runs as root with apt-get, they are installed (nginx-light, else nginx);
# otherwise the script says what to install and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "bench: no virtual environment at $VENV; run 'make bench' (it builds one)" >&2
    exit 2
fi

tools=(wrk)
for arg in "$@"; do
    case $arg in
        --instructions*) tools=(wrk valgrind) ;;  # the package has vgdb and callgrind_annotate
    esac
done

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "bench: missing ${missing[*]}; install as root:" >&2
        echo "  apt-get install -y --no-install-recommends nginx-light ${tools[*]}" >&2
        exit 2
    fi
    # A package install may start the system's nginx service; the benchmark runs its own
    # instances, so a service that was not running before is stopped again afterwards.
    was_running=no
    [ -s /run/nginx.pid ] && was_running=yes
    echo "+ apt-get update && apt-get install -y --no-install-recommends nginx-light ${tools[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q update
    apt-get install -y -q --no-install-recommends nginx-light "${tools[@]}" \
        || apt-get install -y -q --no-install-recommends nginx "${tools[@]}"
    if [ "$was_running" = no ] && [ -s /run/nginx.pid ]; then
        echo "+ stopping the nginx service the package started"
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
            systemctl stop nginx
        else
            /usr/sbin/nginx -s stop || true
        fi
    fi
fi

exec "$VENV/bin/python" bench/bench.py "$@"
