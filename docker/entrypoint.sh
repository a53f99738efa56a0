#!/usr/bin/env bash
# Container entrypoint (runs under tini). It only prepares the shared volume and then runs
# the given command unchanged, so compose files and `docker run` spell out the real command
# (`ray start ...`, `qsearch dashboard ...`). KubeRay replaces the entrypoint with its own
# `ray start` wrapper; nothing here is required there.
set -euo pipefail

shared="${QSEARCH_SHARED:-/shared}"
if [ -d "$shared" ] && [ -w "$shared" ]; then
    # Trial weights, the FP32 warm-start cache and datasets live here on every node.
    mkdir -p "$shared/artifacts" "$shared/cache" "$shared/data" "$shared/work"
elif [ -d "$shared" ]; then
    echo "qsearch-entrypoint: warning: $shared is not writable by uid $(id -u);" \
         "trial weights and the warm-start cache cannot be written there" >&2
fi

if [ "$#" -eq 0 ]; then
    set -- qsearch --help
fi
exec "$@"
