#!/usr/bin/env bash
# Measures the server-set propagation delay at 10,000 servers: a release build of the balancer
# with BALANCER_CPUS=0-1 receives 15 snapshots from a test deployment agent, and the median of
# the `propagation=NNus` figures it logs (arrival on the agent thread to the last shard's
# acknowledgement) is printed with its parts (parse, resolve, shards).
#
# Everything runs on 127.0.0.1 inside the ignored test `propagation_of_10000_server_sets`
# (tests/agent.rs), whose harness kills the balancer it starts (by PID, on drop). The whole run
# is bounded by `timeout`, build included (the fat-LTO release build takes a few minutes).
# Contract: 100 ms; goal: under 5 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --kill-after=10 900 \
    cargo test --release --test agent -- --ignored --nocapture --exact \
    propagation_of_10000_server_sets
