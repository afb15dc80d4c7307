#!/usr/bin/env bash
# Lint and type-check the package, exactly as CI does (configuration in pyproject.toml).
source "$(dirname "$0")/env.sh"
ruff check async_ckpt
mypy
