#!/usr/bin/env bash
# Builds the balancer and runs the built-in demo: three demo backends, a deployment agent that
# pushes changing scores, and the balancer between them. The demo prints how requests spread
# over the backends against their scores, then stops everything it started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/demo
