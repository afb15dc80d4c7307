#!/usr/bin/env bash
# The test suite, exactly as CI runs it. Arguments go to pytest: with no paths it runs tests/
# (pyproject's testpaths); with paths, only those (e.g. scripts/test.sh tests/test_roundtrip.py -x).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
