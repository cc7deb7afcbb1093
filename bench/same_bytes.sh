#!/usr/bin/env bash
# Do two revisions of toss-filter write the same bytes? Runs `filter` from each revision's source (one git worktree
# each, the same .venv) on the same data and prints sha256 of the output's data files, the rejected rows, the
# sidecar and every score shard, then whether they are equal.
# Usage: bash bench/same_bytes.sh REV_A REV_B OUT_DIR [filter options...]
#   e.g. bash bench/same_bytes.sh b4c04be HEAD out/same-bytes --shard-rows 7 --limit 80
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 out=$3; shift 3
python=$PWD/.venv/bin/python
for rev in "$a" "$b"; do
  tree=$out/src-$rev
  [ -d "$tree" ] || git worktree add -q --detach "$tree" "$rev"
  rm -rf "$out/$rev-out" "$out/$rev-out-rejected" "$out/$rev-run"
  (cd "$tree" && PYTHONPATH=$PWD "$python" -m toss_filter.cli filter examples/data/custom_mix.jsonl \
     --safety-model examples/reference-adapters/safety --utility-model examples/reference-adapters/utility \
     --output "../$rev-out" --run-dir "../$rev-run" --no-report --quiet "$@")
  (cd "$out" && find "$rev-out" "$rev-out-rejected" "$rev-run/token_scores" "$rev-run/scores" -type f \
     \( -name '*.arrow' -o -name 'state.json' \) | sort | xargs sha256sum | sed "s#$rev-##" > "$rev.sha256")
done
if diff "$out/$a.sha256" "$out/$b.sha256" > "$out/diff.txt"; then
  echo "identical: $(wc -l < "$out/$a.sha256") files"; cat "$out/$a.sha256"
else
  echo "DIFFERENT:"; cat "$out/diff.txt"
fi
