#!/usr/bin/env bash
# Mutation testing (cosmic-ray) of the modules that hold formulas; prints every surviving mutant.
#
#   bash mutation/run.sh                      # all modules listed below
#   bash mutation/run.sh taxonomy scaling     # some of them (names of mutation/*.toml)
#
# cosmic-ray edits source files in place, so it runs on a copy of the repository in a temporary directory:
# the working tree is never touched. One worker, niced. Each module's tests run through a fork server
# (mutation/forkserver.py) that imports torch and transformers once, so a mutant costs ~1 s, not ~10 s.
# Survivors listed in tests/equivalent_mutants.md are marked as such; the exit status is 1 when a
# survivor is not listed there.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -gt 0 ]; then modules=("$@"); else modules=(crosscoder step sparse distributed module metrics schedules taxonomy scaling causal splice); fi
for m in "${modules[@]}"; do
  [ -f "$repo/mutation/$m.toml" ] || { echo "no mutation/$m.toml" >&2; exit 2; }
done

work=$(mktemp -d -t crosscoder_pl_mutation.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The copy: tracked and untracked files, without .git, outputs and byte-code caches.
mkdir -p "$work/repo" "$work/pristine"
(cd "$repo" && tar --exclude=./.git --exclude=./outputs --exclude='__pycache__' -cf - .) | tar -xf - -C "$work/repo"
cp -r "$work/repo/crosscoder_pl" "$work/pristine/"
cd "$work/repo"
export PYTHONDONTWRITEBYTECODE=1 MUTATION_FORKSERVER="$work/forkserver.sock"
# One thread per torch process: on a small machine, a multithreaded test run next to the fork server's
# import is many times slower, and the tests are tiny.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

nice -n 15 python mutation/forkserver.py serve "$MUTATION_FORKSERVER" > "$work/forkserver.log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do [ -S "$MUTATION_FORKSERVER" ] && break; sleep 1; done
[ -S "$MUTATION_FORKSERVER" ] || { cat "$work/forkserver.log" >&2; echo "fork server did not start" >&2; exit 2; }

status=0
total_start=$(date +%s)
for m in "${modules[@]}"; do
  start=$(date +%s)
  db="$work/$m.sqlite"
  cosmic-ray --verbosity ERROR init "mutation/$m.toml" "$db"
  python mutation/skip_functions.py "mutation/$m.toml" "$db"
  # The unmutated code must pass its tests, or every mutant would count as killed.
  if ! nice -n 15 cosmic-ray --verbosity ERROR baseline "mutation/$m.toml" > "$work/$m.baseline.log" 2>&1; then
    cat "$work/$m.baseline.log" >&2
    echo "$m: baseline failed: the unmutated tests do not pass" >&2
    exit 2
  fi
  nice -n 15 cosmic-ray --verbosity ERROR exec "mutation/$m.toml" "$db"
  cosmic-ray dump "$db" > "$work/$m.jsonl"
  python mutation/survivors.py "$work/$m.jsonl" --equivalent tests/equivalent_mutants.md \
    --seconds $(( $(date +%s) - start )) || status=1
  # Never trust an in-place mutator: after the run the copy's package must be as it was copied.
  diff -r -q crosscoder_pl "$work/pristine/crosscoder_pl" -x __pycache__ >&2 \
    || { echo "$m: cosmic-ray left a mutated file behind (in the copy only)" >&2; exit 2; }
done
echo "mutation testing of ${modules[*]}: $(( $(date +%s) - total_start )) s"
exit $status
