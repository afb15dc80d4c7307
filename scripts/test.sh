#!/usr/bin/env bash
# The test suite, exactly as CI runs it: the unit suite (tests/) and the benchmarks' smoke tests
# (bench/tests/). Extra arguments go to pytest, e.g. -m "not s3 and not multiproc" (README.md).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q tests bench/tests "$@"
