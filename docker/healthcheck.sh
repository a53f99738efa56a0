#!/usr/bin/env bash
# Docker HEALTHCHECK for the qsearch image; QSEARCH_ROLE says what this container is.
#   head       Ray GCS healthy, via the Ray dashboard (the endpoint KubeRay probes too)
#   worker     this node's raylet healthy, via its dashboard agent (port 52365)
#   dashboard  the qsearch dashboard answers HTTP on QSEARCH_DASHBOARD_PORT (8050)
#   (unset)    one-off commands (drivers, `qsearch --help`): nothing long-running to probe
set -euo pipefail

probe() { wget --quiet --tries=1 --timeout=5 --output-document=/dev/null "$1"; }

case "${QSEARCH_ROLE:-}" in
    head)
        probe "http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}/api/gcs_healthz" ;;
    worker)
        probe "http://127.0.0.1:${RAY_DASHBOARD_AGENT_PORT:-52365}/api/local_raylet_healthz" ;;
    dashboard)
        probe "http://127.0.0.1:${QSEARCH_DASHBOARD_PORT:-8050}/" ;;
    "")
        exit 0 ;;
    *)
        echo "qsearch-healthcheck: unknown QSEARCH_ROLE '${QSEARCH_ROLE}' (head|worker|dashboard)" >&2
        exit 1 ;;
esac
