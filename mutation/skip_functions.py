"""Mark the mutants inside presentation-only functions as skipped, before ``cosmic-ray exec``.

A session's toml may list, under ``[cosmic-ray.skip] functions = [...]``, functions whose mutants are not
run: plots and similar presentation code (figure size, dpi, line width, colours), which hold no formula.
Their content that does carry meaning (which values are plotted) is tested where it is computed.

    python mutation/skip_functions.py SESSION.toml SESSION.sqlite
"""

from __future__ import annotations

import sys
import tomllib

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main(config_path: str, db_path: str) -> int:
    with open(config_path, "rb") as handle:
        functions = set(tomllib.load(handle)["cosmic-ray"].get("skip", {}).get("functions", []))
    if not functions:
        return 0
    with use_db(db_path, WorkDB.Mode.open) as db:
        skipped = [
            item.job_id
            for item in db.pending_work_items
            if any(m.definition_name in functions for m in item.mutations)
        ]
        if skipped:
            db.set_multiple_results(
                skipped,
                WorkResult(output=f"skipped: inside {sorted(functions)}", worker_outcome=WorkerOutcome.SKIPPED),
            )
    print(f"{config_path}: {len(skipped)} mutants inside {', '.join(sorted(functions))} skipped (presentation only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
