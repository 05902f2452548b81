#!/bin/sh
# Install Debian packages when we can (apt-get present and running as root); otherwise say
# what is missing and carry on: fmnist downloads the dataset itself, the browser test skips
# with a reason when no chromium is installed, and `fmnist bench serve` uses its own client
# when no wrk is.
set -u
missing=""
for pkg in "$@"; do
    case "$pkg" in
        dataset-fashion-mnist) [ -d /usr/share/datasets/fashion-mnist ] || missing="$missing $pkg" ;;
        chromium) command -v chromium >/dev/null 2>&1 || missing="$missing $pkg" ;;
        wrk) command -v wrk >/dev/null 2>&1 || missing="$missing $pkg" ;;
        *) dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg" ;;
    esac
done
[ -z "$missing" ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages:$missing"
    # Retry once: a stale package list is the usual cause of a failed install.
    apt-get install -y -q $missing >/dev/null 2>&1 || \
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null; } || \
        echo "warning: apt-get install$missing failed; continuing without it" >&2
else
    echo "note: not installing$missing (needs apt-get and root); fmnist downloads the dataset itself" >&2
fi
exit 0
