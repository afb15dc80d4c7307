#!/usr/bin/env bash
# The test suite, exactly as CI runs it: the unit suite (tests/) and the benchmarks' smoke tests
# (bench/tests/), pyproject's testpaths. Arguments go to pytest: markers, e.g.
# -m "not s3 and not multiproc" (README.md), or paths to run only those.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
