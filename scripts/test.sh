#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite.
source "$(dirname "$0")/env.sh"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
