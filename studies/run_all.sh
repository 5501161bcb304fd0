#!/usr/bin/env bash
# Re-run the README's dynamics studies at full size (seed 0) and refresh docs/figures/.
# Run it after any change of the law's constants, the environment or a study:
#
#   studies/run_all.sh                    # all five studies (about 8 min on 2 shared cores)
#   studies/run_all.sh --in-process       # any extra `chronomoe-dyn study` options
#   STUDIES="phases calibrate" studies/run_all.sh
#
# Stores, figures and summary.json land in studies/out/<name>/ (replaced: --overwrite, since a
# constants change makes the old cells another configuration); each study's headline and wall
# time are printed and kept in studies/out/run_all.log. Runs under `nice -n 10` (the machine is
# shared). The copies in docs/figures/ are what the README shows.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}"
out=studies/out
mkdir -p "$out" docs/figures
log="$out/run_all.log"
: > "$log"
for s in ${STUDIES:-phases valley-repair sweep kuramoto calibrate}; do
  start=$(date +%s)
  nice -n 10 python -m chronomoe_dyn.cli study "$s" --no-progress --overwrite "$@" | tee -a "$log"
  echo "$s: wall time $(( $(date +%s) - start )) s" | tee -a "$log"
done
copy() { [ -f "$1" ] && cp "$1" docs/figures/ && echo "copied $1 -> docs/figures/"; }
copy "$out/phases/phases.png"
copy "$out/valley-repair/repair_vs_eta.png"
copy "$out/sweep/sweep_heatmaps.png"
copy "$out/kuramoto/R_vs_K.png"
copy "$out/calibrate/calibrate.png"
copy "$out/calibrate/calibrate.md"
