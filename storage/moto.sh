#!/usr/bin/env bash
# moto's S3 server (AWS's semantics, objects in memory: keep them small) on 127.0.0.1,
# in the foreground: prints the endpoint and the export lines to paste into another shell; Ctrl-C
# (or SIGTERM) stops it and removes its data. Uses the project's venv (scripts/env.sh creates it).
#   storage/moto.sh [--bucket NAME] [--dir PARENT_OF_WORK_FOLDER]
# Same launcher as the tests and bench/: python -m async_ckpt.storage.testing.serve moto
here="$PWD"
source "$(dirname "$0")/../scripts/env.sh"
cd "$here"
exec python -m async_ckpt.storage.testing.serve moto "$@"
