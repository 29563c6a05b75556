"""`sparc-engine eval`: run specs over one dataset (resumably) and score them into one report.

OUT/<spec>/results.jsonl   a result per row, appended as rows finish; a rerun answers only what is missing
OUT/<spec>/spec.json       the spec as validated: resuming with a different spec or --set is refused
OUT/report.json            {"dataset", "rows", "specs": [one dict per spec: SpecScore + spec, results]}
OUT/report.md, OUT/pareto.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from engine.batch import Row, answerer, read_rows, run_dataset
from engine.errors import SpecError, UserError
from engine.spec import Spec, load_spec
from evals.report import markdown_table, plot_pareto
from evals.scoring import SpecScore, score_spec


def spec_names(paths: Sequence[Path]) -> list[str]:
    """Folder names under OUT: the file stems; stems that clash get their parent folder's name in front."""
    stems = [path.stem for path in paths]
    names = [
        f"{path.resolve().parent.name}-{path.stem}" if stems.count(path.stem) > 1 else path.stem
        for path in paths
    ]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise UserError(f"two specs would write their results to OUT/{clashes[0]}: rename one of them")
    return names


def _load_specs(paths: Sequence[Path], overrides: list[str]) -> dict[str, Spec]:
    """Every spec validated before any model opens; the problems of all of them reported at once."""
    specs, problems = {}, []
    for name, path in zip(spec_names(paths), paths):
        try:
            specs[name] = load_spec(path, overrides)
        except SpecError as error:
            problems += [f"{path}: {problem}" for problem in error.problems]
    if problems:
        raise SpecError(problems)
    return specs


def _spec_record(spec: Spec) -> dict:
    """What a spec's results depend on (not its label or example); stages keyed by their names (a plain
    dump loses the stage types)."""
    raw = spec.model_dump(mode="json", exclude={"name", "stages", "example"})
    return {**raw, "stages": [{stage.name: stage.model_dump(mode="json")} for stage in spec.stages]}


def _claim(folder: Path, spec: Spec) -> None:
    """Record the spec a results folder belongs to, or check that a rerun uses the same one."""
    path, record = folder / "spec.json", _spec_record(spec)
    if path.is_file():
        if json.loads(path.read_text()) != record:
            raise UserError(
                f"{folder} holds results of another spec or --set (see {path}): use another --out or delete it"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _read_results(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return {str(record["id"]): record for record in map(json.loads, filter(str.strip, lines))}


def _write_report(
    args: argparse.Namespace, rows: list[Row], scored: list[tuple[Path, Path, SpecScore]]
) -> None:
    """scored: (spec file, its results, its score) per spec."""
    specs = [{"spec": str(spec), "results": str(results), **asdict(score)} for spec, results, score in scored]
    report = {"dataset": str(args.dataset), "rows": len(rows), "specs": specs}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    about = f"{args.dataset.parent.name}/{args.dataset.name}, {len(rows)} rows"
    scores = [score for _, _, score in scored]
    (args.out / "report.md").write_text(f"# Eval on {about}\n\n{markdown_table(scores)}")
    plot_pareto(scores, args.out / "pareto.png", title=f"accuracy vs visual tokens: {about}")


def eval_command(args: argparse.Namespace) -> str | int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {args.limit})")
    specs = _load_specs(args.specs, args.overrides)
    rows = read_rows(args.dataset)[: args.limit]
    unanswerable = [row.id for row in rows if "answer" not in row.extra]
    if unanswerable:
        raise UserError(
            f"{args.dataset}: {len(unanswerable)} rows have no 'answer' (first: id {unanswerable[0]!r}); "
            "eval scores against ground truth"
        )
    by = [field.strip() for field in args.by.split(",") if field.strip()]
    for name, spec in specs.items():
        _claim(args.out / name, spec)

    lines, scored = [], []
    for path, (name, spec) in zip(args.specs, specs.items()):
        results = args.out / name / "results.jsonl"
        # the model opens only when some row is missing
        counts = run_dataset(
            args.dataset,
            results,
            answerer(spec, args.ray, args.workers),
            limit=args.limit,
            desc=spec.name or name,
        )
        score = score_spec(spec.name or name, rows, _read_results(results), by)
        scored.append((path, results, score))
        accuracy = "–" if score.accuracy is None else f"{100 * score.accuracy:.1f}%"
        lines.append(
            f"{score.name}: accuracy {accuracy}; {counts.done} answered now, {counts.skipped} already in "
            f"{results}, {counts.failed} failed"
        )
    _write_report(args, rows, scored)
    lines.append(f"report: {args.out / 'report.md'} (+ report.json, pareto.png)")
    if any(score.failed for _, _, score in scored):
        print("\n".join(lines))
        print("some rows failed (reported above); a rerun retries them", file=sys.stderr)
        return 1
    return "\n".join(lines)
