"""sparc-engine: run SPARC pipeline specs on images, validate specs, export models.

Exit codes: 0 done, 1 bad input or a failed run (one-line message), 2 bad spec or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import BENCH
from engine.commands import Command, add_commands, add_overrides_argument, add_ray_arguments, run_command
from engine.errors import SpecError, UserError
from engine.spec import Spec, load_spec
from evals import DATA_COMMANDS, EVAL_COMMANDS
from export import EXPORTERS
from runtimes.protocol import RuntimeInputError
from train import TRAINERS

EPILOG = """examples:
  sparc-engine run specs/demo.yaml --image cat.jpg --question "What is on the table?"
  sparc-engine run specs/qwen3vl-sparc-wbf8.yaml --image cat.jpg --question "..." --json --save-viz out.png
  sparc-engine run specs/qwen3vl-sparc.yaml --dataset questions.jsonl --out answers.jsonl
  sparc-engine run specs/demo.yaml --dataset questions.jsonl --out answers.jsonl --ray --workers 2
  sparc-engine validate specs/qwen3vl-sparc.yaml --set stages.0.perceive.rollouts=4
  sparc-engine serve specs/demo.yaml --port 8080
  sparc-engine data synth --out data/shapes --n 200 --seed 1
  sparc-engine eval specs/demo.yaml specs/demo/baseline-256.yaml --dataset data/shapes/rows.jsonl --out out/eval
  sparc-engine bench --shape 65m --repeats 1
  sparc-engine train perception-lora --model CKPT --dataset rows.jsonl --out adapters/perception
"""

# command group -> its registry; each entry's code loads only when it is asked for
GROUPS: dict[str, tuple[str, dict[str, Command]]] = {
    "export": ("export a Hugging Face checkpoint to a bundle (needs [export])", EXPORTERS),
    "data": ("make or convert datasets: the synthetic shapes benchmark, V*Bench, HR-Bench", DATA_COMMANDS),
    "train": ("fine-tune: the perception LoRA, the demo model (needs [export])", TRAINERS),
}


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="pipeline spec (YAML), e.g. specs/demo.yaml")
    add_overrides_argument(
        parser, "override a spec value, e.g. --set model.runtime=torch_ref --set stages.0.perceive.rollouts=4"
    )


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_spec_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $SPARC_ENGINE_API_KEY, else none)"
    )
    for flag, value, help_text in (
        ("--queue-size", 8, "requests waiting for the pipeline (one more runs); beyond it: 503"),
        ("--max-body-bytes", 20 * 2**20, "largest request body, base64 included"),
        ("--max-image-pixels", 40_000_000, "largest image, width x height, checked before decoding"),
        ("--max-question-chars", 4000, "longest question"),
    ):
        parser.add_argument(
            flag, type=int, default=value, metavar="N", help=f"{help_text} (default {value:,})"
        )


# top-level commands whose code loads lazily
COMMANDS: dict[str, Command] = {
    **EVAL_COMMANDS,
    "bench": BENCH,
    "serve": Command(
        "serve a spec over HTTP: /v1/sparc, OpenAI-compatible /v1/chat/completions, /health",
        _serve_arguments,
        "engine.serve:serve_command",
        extra="serve",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparc-engine",
        description="SPARC inference: localize on a low-resolution view over N rollouts, fuse the boxes, "
        "then answer from the view plus high-resolution crops.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="answer a question on an image, or a JSONL dataset of them")
    _add_spec_arguments(run)
    one = run.add_argument_group("one image")
    one.add_argument("--image", type=Path, help="image file")
    one.add_argument("--question", help="question about the image")
    one.add_argument(
        "--json", action="store_true", help="print exactly one JSON object: answer, regions, stages"
    )
    one.add_argument(
        "--save-viz", type=Path, metavar="OUT.png", help="write the image with the regions drawn"
    )
    many = run.add_argument_group("a dataset")
    many.add_argument(
        "--dataset", type=Path, metavar="IN.jsonl", help='rows {"id", "image", "question", ...}'
    )
    many.add_argument("--out", type=Path, metavar="OUT.jsonl", help="results, appended; a rerun resumes")
    add_ray_arguments(many)

    validate = commands.add_parser("validate", help="check a spec without loading a model")
    _add_spec_arguments(validate)

    add_commands(commands, COMMANDS)
    for group, (help_text, registry) in GROUPS.items():
        sub = commands.add_parser(group, help=help_text, description=help_text)
        add_commands(sub.add_subparsers(dest="subcommand", required=True, metavar="COMMAND"), registry)
    return parser


def _run_one(spec: Spec, args: argparse.Namespace) -> int:
    from engine.imaging import load_image
    from engine.pipeline import open_pipeline

    image = load_image(args.image)
    result = open_pipeline(spec).run(image, args.question)
    if args.save_viz:
        from engine.viz import draw_regions

        args.save_viz.parent.mkdir(parents=True, exist_ok=True)
        draw_regions(image, [(r.box, r.score) for r in result.regions]).save(args.save_viz, format="PNG")
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"answer: {result.answer}")
    print(f"regions ({len(result.regions)}, pixels of the {image.width}x{image.height} image):")
    for region in result.regions:
        print(f"  {region.box.as_list()}  agreement {region.score:.2f}")
    print(f"{'stage':<10}{'prompt':>8}{'reused':>8}{'generated':>11}{'visual':>8}{'ms':>10}")
    for stage in result.stages:
        row = stage.to_dict()
        print(
            f"{stage.name:<10}{row['prompt_tokens']:>8}{row['reused_tokens']:>8}"
            f"{row['generated_tokens']:>11}{row['visual_tokens']:>8}{row['ms']:>10.1f}"
        )
        for note in stage.notes:
            print(f"  note: {note}")
    if args.save_viz:
        print(f"regions drawn to {args.save_viz}")
    return 0


def _run_dataset(spec: Spec, args: argparse.Namespace) -> int:
    from engine.batch import answerer, run_dataset

    counts = run_dataset(args.dataset, args.out, answerer(spec, args.ray, args.workers))
    print(
        f"{counts.done} answered, {counts.skipped} already in {args.out}, {counts.failed} failed",
        file=sys.stderr,
    )
    return 1 if counts.failed else 0


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    single = args.image is not None or args.question is not None
    if (args.dataset or args.out) and (single or not (args.dataset and args.out)):
        parser.error("run: give --dataset IN.jsonl with --out OUT.jsonl, or --image with --question")
    if args.ray is not None and not args.dataset:
        parser.error("run: --ray answers a --dataset")
    spec = load_spec(args.spec, args.overrides)
    if not args.dataset and spec.example:
        args.image = args.image or Path(spec.example.image)
        args.question = args.question or spec.example.question
    if not args.dataset and not (args.image and args.question):
        parser.error(
            "run: give --image PATH and --question TEXT (or --dataset/--out); the spec has no example"
        )
    return _run_dataset(spec, args) if args.dataset else _run_one(spec, args)


def _lazy(args: argparse.Namespace) -> int:
    command = COMMANDS[args.command] if args.command in COMMANDS else GROUPS[args.command][1][args.subcommand]
    outcome = run_command(command, args)
    if isinstance(outcome, int):
        return outcome
    print(outcome)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            return _run(args, parser)
        if args.command == "validate":
            spec = load_spec(args.spec, args.overrides)
            print(
                f"{args.spec}: ok ({' -> '.join(s.name for s in spec.stages)}, runtime {spec.model.runtime})"
            )
            return 0
        return _lazy(args)
    except SpecError as error:
        for problem in error.problems:
            print(f"spec error: {problem}", file=sys.stderr)
        return error.exit_code
    except (UserError, RuntimeInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
