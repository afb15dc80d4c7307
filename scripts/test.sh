#!/usr/bin/env bash
# The test suite, exactly as CI runs it.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q tests "$@"
