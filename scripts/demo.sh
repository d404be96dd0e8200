#!/usr/bin/env bash
# `make demo`, the README's main job: a simulated cluster (the real upstream control plane and
# three simulated GPU nodes), two workers sharing the 10 GiB GPU, the printout, then cluster down.
exec "$(dirname "$0")/cluster.sh" demo
