#!/usr/bin/env bash
# Snakemake runs this inside the new conda env: packages that must not pull their deps.
set -euo pipefail
pip install --no-deps -r "$(dirname "${BASH_SOURCE[0]}")/requirements-nodeps.txt"
