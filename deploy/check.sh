#!/usr/bin/env bash
# Check the deployment files with their own tools; `make test` runs this after lint, before
# pytest. The Python side (Kubernetes schemas and overlays, the wheel's entry point, metric
# names against a running proxy) is tests/test_deploy.py.
#
# Every command is printed before it runs; the first failure stops the script with its exit
# code. A tool that is missing and cannot be installed prints a SKIP line instead.
# promtool comes from Debian's prometheus package: when it is not on PATH, the package is
# downloaded with apt-get and only promtool is unpacked into $KSZ_DEPLOY_TOOLS (nothing is
# installed system-wide, so no Prometheus server is ever started).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
TOOLS=${KSZ_DEPLOY_TOOLS:-$VENV/deploy-tools}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

run() {
    echo "+ $*"
    "$@"
}

skip() {
    echo "SKIP: $*"
}

section() {
    echo
    echo "== $*"
}

# Print the path of promtool, fetching it if needed; print nothing when it cannot be had.
find_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        command -v promtool
        return
    fi
    if [ -x "$TOOLS/promtool" ]; then
        echo "$TOOLS/promtool"
        return
    fi
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || return 0
    local dl="$WORK/apt"
    mkdir -p "$dl"
    chmod 755 "$dl"
    if ! (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download prometheus) >&2; then
        [ "$(id -u)" = 0 ] || return 0
        echo "+ apt-get update" >&2
        apt-get -q update >&2 || return 0
        (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download prometheus) >&2 || return 0
    fi
    dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -C "$dl" ./usr/bin/promtool \
        && mkdir -p "$TOOLS" \
        && install -m 0755 "$dl/usr/bin/promtool" "$TOOLS/promtool" \
        && echo "$TOOLS/promtool" \
        || return 0
}

section "Dockerfile (hadolint)"
run "$BIN/hadolint" --version
run "$BIN/hadolint" Dockerfile

section "YAML style (yamllint)"
run "$BIN/yamllint" -c deploy/yamllint.yaml --strict deploy/

section "Compose file (compose-spec schema)"
run "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml

section "Grafana dashboard (JSON)"
run "$BIN/python" -m json.tool deploy/grafana/ksz-proxy-dashboard.json "$WORK/dashboard.json"

section "Prometheus rules (promtool)"
echo "+ find promtool (PATH, $TOOLS, else apt-get download prometheus)"
PROMTOOL=$(find_promtool)
if [ -n "$PROMTOOL" ]; then
    run "$PROMTOOL" --version
    run "$PROMTOOL" check rules deploy/prometheus/ksz-proxy.rules.yml
    run "$PROMTOOL" test rules deploy/prometheus/ksz-proxy.rules.test.yml
else
    skip "promtool: not on PATH and Debian's prometheus package could not be downloaded"
fi

section "systemd unit (systemd-analyze)"
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify refuses an ExecStart binary that does not exist on this machine, so check a copy
    # whose ExecStart names a stand-in; every other line is the unit as shipped.
    stand_in="$WORK/ksz-proxy"
    printf '#!/bin/sh\nexit 0\n' >"$stand_in"
    chmod 755 "$stand_in"
    unit="$WORK/ksz-proxy.service"
    sed "s#^ExecStart=/opt/ksz-proxy/bin/ksz-proxy #ExecStart=$stand_in #" \
        deploy/systemd/ksz-proxy.service >"$unit"
    grep -q "^ExecStart=$stand_in run " "$unit" || {
        echo "deploy/systemd/ksz-proxy.service: ExecStart is not /opt/ksz-proxy/bin/ksz-proxy run ..."
        exit 1
    }
    echo "+ systemd-analyze verify ksz-proxy.service (ExecStart -> $stand_in)"
    # verify exits 0 on unknown keys and only prints them: any output is a failure.
    out=$(systemd-analyze verify "$unit" 2>&1) || { echo "$out"; exit 1; }
    if [ -n "$out" ]; then
        echo "$out"
        exit 1
    fi
    if systemd-analyze --help 2>/dev/null | grep -q -- '--offline'; then
        # Exposure on systemd's 0-100 scale (shown divided by 10): 20 is "2.0 OK".
        echo "+ systemd-analyze security --offline=yes --threshold=20 ksz-proxy.service"
        out=$(systemd-analyze security --offline=yes --threshold=20 --no-pager "$unit" 2>&1) \
            || { echo "$out"; exit 1; }
        echo "$out" | tail -n 1
    else
        skip "systemd-analyze security --offline: needs systemd >= 250"
    fi
else
    skip "systemd-analyze: not installed (systemd unit not verified)"
fi

echo
echo "deploy checks passed"
