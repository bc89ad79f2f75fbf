"""Mark mutants that cannot change what the program computes as skipped, before ``cosmic-ray exec``.

Two rules, both decided before any mutant runs:

1. Presentation-only functions. A session's toml may list, under ``[cosmic-ray.skip] functions = [...]``,
   functions whose mutants are not run: plots and similar presentation code (figure size, dpi, line
   width, colours), which hold no formula. Their content that does carry meaning (which values are
   plotted) is tested where it is computed.

2. Type annotations under ``from __future__ import annotations`` (PEP 563). In such a module no
   annotation is ever evaluated: the compiler stores each one as a string. A mutant whose whole source
   span (cosmic-ray's ``start_pos`` .. ``end_pos``) lies inside an annotation -- of a function argument
   (positional, keyword-only, ``*args``, ``**kwargs``), of a function's return, or of an annotated
   assignment (``x: int | None = ...``) -- therefore runs exactly the code of the original (e.g.
   ``str | Path`` -> ``str ^ Path`` only changes a string nobody reads) and is skipped. The spans come from
   ``ast`` (``lineno``/``col_offset``/``end_lineno``/``end_col_offset``; ``ast`` counts columns in UTF-8
   bytes, cosmic-ray in characters, so they are converted). The rule applies ONLY to modules whose
   ``ast`` has the ``from __future__ import annotations`` statement; in any other module annotations of
   functions and of module/class-level assignments are evaluated, and their mutants run as usual. It
   assumes the mutated modules do not evaluate their own annotations at run time (``typing.get_type_hints``,
   ``OmegaConf.structured``, pydantic): none of the configured modules does.

    python mutation/skip_functions.py SESSION.toml SESSION.sqlite
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

Span = tuple[tuple[int, int], tuple[int, int]]  # ((line, column), (end line, end column)), columns in characters


def has_future_annotations(tree: ast.Module) -> bool:
    """Whether the module has ``from __future__ import annotations`` (it can only be at the top)."""
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def annotation_spans(source: str) -> list[Span] | None:
    """Source spans of every function-argument, return and annotated-assignment annotation of ``source``;
    None when the module does not have ``from __future__ import annotations`` (its annotations can run)."""
    tree = ast.parse(source)
    if not has_future_annotations(tree):
        return None
    lines = source.splitlines()

    def position(line: int, byte_col: int) -> tuple[int, int]:
        return line, len(lines[line - 1].encode()[:byte_col].decode())

    spans = []
    for node in ast.walk(tree):
        annotations: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            annotations += [arg.annotation for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            annotations += [a.vararg.annotation if a.vararg else None, a.kwarg.annotation if a.kwarg else None]
            if not isinstance(node, ast.Lambda):
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for ann in annotations:
            if ann is not None:
                spans.append((position(ann.lineno, ann.col_offset), position(ann.end_lineno, ann.end_col_offset)))
    return spans


def inside(start: tuple[int, int], end: tuple[int, int], spans: list[Span]) -> bool:
    return any(s <= tuple(start) and tuple(end) <= e for s, e in spans)


def main(config_path: str, db_path: str) -> int:
    with open(config_path, "rb") as handle:
        config = tomllib.load(handle)["cosmic-ray"]
    functions = set(config.get("skip", {}).get("functions", []))
    spans_of: dict[Path, list[Span] | None] = {}

    def annotation_only(mutation) -> bool:
        path = Path(mutation.module_path)
        if path not in spans_of:
            spans_of[path] = annotation_spans(path.read_text())
        spans = spans_of[path]
        return spans is not None and inside(mutation.start_pos, mutation.end_pos, spans)

    in_functions, in_annotations = [], []
    with use_db(db_path, WorkDB.Mode.open) as db:
        for item in db.pending_work_items:
            if functions and any(m.definition_name in functions for m in item.mutations):
                in_functions.append(item.job_id)
            elif item.mutations and all(annotation_only(m) for m in item.mutations):
                in_annotations.append(item.job_id)
        if in_functions:
            db.set_multiple_results(
                in_functions,
                WorkResult(output=f"skipped: inside {sorted(functions)}", worker_outcome=WorkerOutcome.SKIPPED),
            )
        if in_annotations:
            db.set_multiple_results(
                in_annotations,
                WorkResult(
                    output="skipped: inside a type annotation under `from __future__ import annotations` (never evaluated)",
                    worker_outcome=WorkerOutcome.SKIPPED,
                ),
            )
    if functions:
        print(f"{config_path}: {len(in_functions)} mutants inside {', '.join(sorted(functions))} skipped (presentation only)")
    for path, spans in spans_of.items():
        if spans is None:
            print(f"{config_path}: {path} has no `from __future__ import annotations`: its annotation mutants run")
    print(f"{config_path}: {len(in_annotations)} mutants inside type annotations skipped "
          "(never evaluated under `from __future__ import annotations`)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
