#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
#
# When another apt or dpkg process holds the package locks (an unattended upgrade, another
# install), wait for it, saying so, instead of failing at once: up to APT_LOCK_WAIT_SECONDS
# (default 600), checked every 5 s, then apt itself waits on the dpkg lock for the same time.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
WAIT_SECONDS="${APT_LOCK_WAIT_SECONDS:-600}"
LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock)

# True while a process has one of apt's or dpkg's lock files open (fuser from psmisc), or, without
# fuser, while an apt or dpkg process runs (pgrep from procps); false when neither tool exists.
apt_busy() {
    if command -v fuser >/dev/null 2>&1; then
        $SUDO fuser "${LOCKS[@]}" >/dev/null 2>&1
    elif command -v pgrep >/dev/null 2>&1; then
        pgrep -x 'apt|apt-get|aptitude|dpkg|unattended-upgr' >/dev/null 2>&1
    else
        return 1
    fi
}

wait_for_apt() {
    local waited=0
    while apt_busy; do
        if [ "$waited" -ge "$WAIT_SECONDS" ]; then
            echo "install-browser: another apt/dpkg process still holds the package lock after ${WAIT_SECONDS} s;" \
                "let it finish (see: ps -ef | grep -E 'apt|dpkg') and run this again," \
                "or wait longer with APT_LOCK_WAIT_SECONDS=N." >&2
            exit 1
        fi
        if [ "$waited" -eq 0 ]; then
            echo "install-browser: another apt/dpkg process holds the package lock; waiting for it" \
                "(up to ${WAIT_SECONDS} s)..." >&2
        fi
        sleep 5
        waited=$((waited + 5))
    done
    if [ "$waited" -gt 0 ]; then
        echo "install-browser: the package lock is free after ${waited} s; installing chromium." >&2
    fi
}

APT_OPTIONS=(-o "DPkg::Lock::Timeout=${WAIT_SECONDS}")
wait_for_apt
$SUDO apt-get "${APT_OPTIONS[@]}" update -qq
wait_for_apt
DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_OPTIONS[@]}" install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
