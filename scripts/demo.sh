#!/usr/bin/env bash
# The main job: a small training run with async checkpoints on the local filesystem, then resume.
source "$(dirname "$0")/env.sh"
exec python examples/train_demo.py "$@"
