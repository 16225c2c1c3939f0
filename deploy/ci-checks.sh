#!/usr/bin/env bash
# deploy/ci-checks.sh: check deploy/ with the real tools.
#
#   promtool check config   deploy/prometheus/prometheus.yml (and the rule files it loads)
#   promtool check rules    deploy/prometheus/rules/*.yml
#   promtool test rules     deploy/prometheus/tests/*.yml
#   systemd-analyze verify  deploy/systemd/sharedpoold{,-metrics}.socket, sharedpoold.service
#   systemd-analyze security --offline: exposure of the service at most 2.0
#
# Installs Debian's `prometheus` (promtool, and the prometheus binary that
# tests/support/prom_server.py starts) and `systemd` (systemd-analyze) when they
# are missing. Runs every check, then exits non-zero if any failed.
#
# systemd-analyze verify refuses a unit whose ExecStart binary does not exist,
# so the units are verified as a copy in a temporary directory whose ExecStart
# points at an existing executable: the real sharedpoold when the project's venv
# exists (.venv/bin/sharedpoold, which must then be installed; it also checks
# that the daemon accepts ExecStart's arguments), else sharedpoold on PATH, else
# /bin/true. Only the path changes; every other line is verified as committed.
# verify exits 0 on unknown keys and other warnings, so any message about our
# units counts as a failure too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '== %s\n' "$*"; }

install_missing() {
    local pkgs=()
    command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus)
    [[ -x /usr/bin/prometheus ]] || [[ " ${pkgs[*]} " == *" prometheus "* ]] || pkgs+=(prometheus)
    command -v systemd-analyze >/dev/null 2>&1 || pkgs+=(systemd)
    if ((${#pkgs[@]} == 0)); then
        return 0
    fi
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        sudo=(sudo)
    fi
    log "installing Debian packages: ${pkgs[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

passed=0
failed=0
failures=()

check() {
    local name="$1"
    shift
    log "$name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$name")
        printf 'FAILED: %s\n' "$name"
    fi
}

verify_units() {
    local dir="$1" out rc=0
    out="$(systemd-analyze verify --man=no "$dir/sharedpoold.socket" "$dir/sharedpoold-metrics.socket" "$dir/sharedpoold.service" 2>&1)" || rc=$?
    [[ -n "$out" ]] && printf '%s\n' "$out"
    if ((rc != 0)); then
        return "$rc"
    fi
    if grep -q sharedpoold <<<"$out"; then
        echo "systemd-analyze verify reported problems in our units (see above)"
        return 1
    fi
}

security_units() {
    local dir="$1"
    # --threshold is the exposure level times ten: fail above 2.0.
    systemd-analyze security --offline=true --threshold=20 "$dir/sharedpoold.service" \
        | grep -E '^(✗|→)|Overall'
}

install_missing
log "promtool: $(promtool --version 2>&1 | head -n1)"
log "systemd-analyze: $(systemd-analyze --version | head -n1)"

check "promtool check config" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules" promtool check rules deploy/prometheus/rules/*.yml
check "promtool test rules" promtool test rules deploy/prometheus/tests/*.yml

unitdir="$(mktemp -d)"
trap 'rm -rf "$unitdir"' EXIT
# The real daemon when the project's venv exists (it must then hold the console
# script: `make` or `pip install -e .` creates it), else sharedpoold on PATH,
# else /bin/true (a clean clone before `make`).
exe=/bin/true
if [[ -x "$ROOT/.venv/bin/python" ]]; then
    exe="$ROOT/.venv/bin/sharedpoold"
elif command -v sharedpoold >/dev/null 2>&1; then
    exe="$(command -v sharedpoold)"
fi
cp deploy/systemd/sharedpoold.service deploy/systemd/sharedpoold.socket deploy/systemd/sharedpoold-metrics.socket "$unitdir/"
sed -i "s|^ExecStart=/usr/local/bin/sharedpoold |ExecStart=$exe |" "$unitdir/sharedpoold.service"
grep -q "^ExecStart=$exe " "$unitdir/sharedpoold.service" || {
    echo "could not rewrite ExecStart in the copy of sharedpoold.service" >&2
    exit 1
}

real_binary() {
    if [[ ! -x "$exe" ]]; then
        echo "$exe missing: the venv exists but the project is not installed in it (run make, or .venv/bin/pip install -e .)"
        return 1
    fi
    # ExecStart's arguments as systemd passes them (%S = /var/lib, no SHAREDPOOLD_ARGS),
    # parsed and validated by the daemon without starting it.
    "$exe" --state-dir /var/lib/sharedpoold --check-config >/dev/null
}

if [[ "$exe" == /bin/true ]]; then
    log "no sharedpoold installed: verifying the units with ExecStart=/bin/true"
else
    log "verifying the units with ExecStart=$exe"
    check "sharedpoold accepts the unit's ExecStart arguments" real_binary
fi
check "systemd-analyze verify" verify_units "$unitdir"
check "systemd-analyze security (exposure <= 2.0)" security_units "$unitdir"

if ((failed > 0)); then
    printf 'ci-checks failed: %s\n' "${failures[*]}"
fi
printf '%d passed, %d failed\n' "$passed" "$failed"
((failed == 0))
