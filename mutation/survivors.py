"""Summarise one cosmic-ray session (``cosmic-ray dump`` output): counts, and every survivor with its diff.

Survivors listed in ``tests/equivalent_mutants.md`` (a table row ``| module | line | operator | ...``)
are marked "equivalent (listed)"; exit status 1 when any survivor is not listed. The operator cell may be a
shell-style pattern (``core/ReplaceBinaryOperator_LShift_*``: every replacement of ``<<`` on that line).

    python mutation/survivors.py SESSION.jsonl --equivalent tests/equivalent_mutants.md [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from fnmatch import fnmatchcase
from pathlib import Path


def listed_equivalents(path: Path) -> set[tuple[str, int, str]]:
    """``(module path, line, operator)`` of every table row of the equivalent-mutants file."""
    rows = set()
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].endswith(".py") and cells[1].isdigit():
            rows.add((cells[0], int(cells[1]), cells[2]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("session")
    parser.add_argument("--equivalent", type=Path, default=Path("tests/equivalent_mutants.md"))
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args()

    equivalents = listed_equivalents(args.equivalent)
    outcomes: Counter[str] = Counter()
    survivors, module = [], "?"
    for line in Path(args.session).read_text().splitlines():
        item, result = json.loads(line)
        mutation = item["mutations"][0]
        module = mutation["module_path"]
        if result is None:
            outcomes["not run"] += 1
        elif result["worker_outcome"] == "no-test":
            outcomes["no mutation possible"] += 1
        elif result["worker_outcome"] == "skipped":
            why = "annotation" if "annotation" in (result.get("output") or "") else "presentation"
            outcomes[f"skipped ({why})"] += 1
        elif result["worker_outcome"] != "normal":
            outcomes[f"worker {result['worker_outcome']}"] += 1
        else:
            outcomes[result["test_outcome"]] += 1
            if result["test_outcome"] == "survived":
                survivors.append((mutation, result))

    unlisted = 0
    for mutation, result in sorted(survivors, key=lambda s: tuple(s[0]["start_pos"])):
        line_no = mutation["start_pos"][0]
        listed = any(module_path == mutation["module_path"] and line == line_no
                     and fnmatchcase(mutation["operator_name"], operator)
                     for module_path, line, operator in equivalents)
        unlisted += not listed
        label = "equivalent (listed)" if listed else "SURVIVED, not listed as equivalent"
        print(f"--- {mutation['module_path']}:{line_no} {mutation['operator_name']} "
              f"(occurrence {mutation['occurrence']}): {label}")
        diff = [d for d in result.get("diff", "").splitlines() if re.match(r"^[-+][^-+]", d)]
        print("\n".join(f"    {d}" for d in diff))
    timing = f" in {args.seconds} s" if args.seconds is not None else ""
    counts = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()))
    print(f"== {module}: {sum(outcomes.values())} mutants{timing}: {counts}; "
          f"survivors listed as equivalent {len(survivors) - unlisted}, not listed {unlisted}")
    return 1 if unlisted else 0


if __name__ == "__main__":
    sys.exit(main())
