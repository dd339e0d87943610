#!/bin/sh
# The availability figures of the README (issue 11): each scenario three times, reports in
# artifacts/availability/ (not committed). Run from the repository root: make availability.
set -eu
out=artifacts/availability
mkdir -p "$out"
for i in 1 2 3; do
  python -m load kill-leader --rate 200 --duration 45 --kills 5 --report "$out/kill-leader-$i.json"
  python -m load term-leader --rate 200 --duration 40 --kills 3 --report "$out/term-leader-$i.json"
  python -m load pause-leader --rate 200 --duration 30 --report "$out/pause-leader-$i.json"
done
python -m load steady --rate 200 --duration 60 --report "$out/steady-1.json"
python -m load postgres-restart --rate 200 --duration 30 --report "$out/postgres-restart-1.json"
