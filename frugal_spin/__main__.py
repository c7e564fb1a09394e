"""Command line.

    python -m frugal_spin RECIPE.yaml [section.key=value ...] [--restart] [--dry-run] [--allow-existing-dir]
                                                                                         run the whole method
    python -m frugal_spin report RUN_DIR                                                 re-render report.md/json/PNGs
    python -m frugal_spin plan RECIPE.yaml [overrides] [--gpu t4|l4|a10|a100-40|a100-80|h100]  estimate peak memory
    python -m frugal_spin compare RECIPE.yaml [overrides]   LoRA-SPIN vs continued LoRA-SFT over seeds -> comparison.md
    python -m frugal_spin export RUN_DIR [--stage sft|iter_<t>|last] OUT_DIR   merged 16-bit model + adapter + card
    python -m frugal_spin build-base [--out DIR]   rebuild the shipped tiny base after changing its spec
    python -m frugal_spin sample RUN_DIR --prompt "..." [--stages base,sft,iter_0] [--max-new-tokens N]   side by side

A user mistake (recipe, override, path, dataset) prints one line, `error: ...`, and exits with status 2; nothing
else of the run is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from frugal_spin.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin",
        description="LoRA SFT then SPIN self-play iterations on a 4-bit base, as described by a YAML recipe.")
    parser.add_argument("recipe", help="path to a recipe YAML file, e.g. recipes/cpu_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override recipe values, type-checked like the file (e.g. spin.iterations=1)")
    parser.add_argument("--restart", action="store_true",
                        help="delete what the earlier run in output_dir wrote and start over (default: resume); "
                             "only in a frugal_spin run directory, and other files there are kept")
    parser.add_argument("--allow-existing-dir", action="store_true",
                        help="write the run into an existing non-empty directory that is not a run directory "
                             "(an entry there with a name the run writes, e.g. report.md or base/, is refused, "
                             "never replaced)")
    parser.add_argument("--dry-run", action="store_true",
                        help="apply the run's checks that load nothing (output directory, model and data references) "
                             "and print the resolved recipe and its stages, without loading weights or data")
    return parser


def dry_run(recipe, restart: bool = False, allow_existing: bool = False) -> None:
    """The checks the run applies before it loads anything (pipeline.check_before_loading: the output directory,
    the model, data and logger references), then the resolved recipe and the stages the run would go through
    (plan.py), without loading weights or data and without writing anything."""
    from frugal_spin.config import dump_recipe
    from frugal_spin.model import resolve_backend
    from frugal_spin.pipeline import check_before_loading
    from frugal_spin.plan import plan

    check_before_loading(recipe, restart, allow_existing)
    here = "cuda" if torch_cuda_visible() else "cpu"
    device = here if recipe.model.device == "auto" else recipe.model.device
    print(dump_recipe(recipe), end="")
    print(f"# model: {recipe.model.name} (4-bit: {recipe.model.load_in_4bit}, device: {recipe.model.device})")
    if device == "cuda" and here == "cpu":
        print(f"# backend: {recipe.model.backend} (no CUDA GPU on this machine; the run needs one)")
    else:
        import torch

        print(f"# backend on this machine: {resolve_backend(recipe.model, torch.device(device))} ({device})")
    print(f"# data: {recipe.data.dataset} (fraction {recipe.data.fraction}, held-out {recipe.data.eval_size})")
    print(f"# stages: {' | '.join(spec.name for spec in plan(recipe))}")
    print(f"# output directory: {recipe.output_dir}")


def torch_cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m frugal_spin report",
                                     description="Re-render report.md, report.json and the charts of a run.")
    parser.add_argument("run_dir", help="a run directory (the recipe's output_dir)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from frugal_spin.config import check_path_text
    from frugal_spin.report import render_report
    from frugal_spin.rundir import require_run_dir

    check_path_text("run directory", args.run_dir)
    # report.md/json and the charts replace files of those names: only in a directory the tool owns.
    run_dir = require_run_dir(Path(args.run_dir), "report")
    render_report(run_dir)
    print(run_dir / "report.md")
    return 0


def run_main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come after --restart too
    from frugal_spin.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        dry_run(recipe, restart=args.restart, allow_existing=args.allow_existing_dir)
        return 0
    from frugal_spin.ui import quiet_libraries

    quiet_libraries()
    from frugal_spin import distributed
    from frugal_spin.model import resolve_runtime
    from frugal_spin.pipeline import run_recipe

    # Under torchrun / accelerate launch: join the other ranks (one process: nothing happens).
    distributed.init_from_env(recipe.distributed.timeout_s, resolve_runtime(recipe.model).device.type)
    run_recipe(recipe, restart=args.restart, allow_existing=args.allow_existing_dir)
    distributed.shutdown()  # not on an error: `main` first asks the other ranks whether they said it already
    return 0


def plan_main(argv: list[str]) -> int:
    from frugal_spin.planner import plan_main as planner_main

    return planner_main(argv)


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin compare",
        description="From the same SFT adapter, the recipe's SPIN iterations against continued LoRA SFT with equal "
                    "optimizer steps (and equal wall time when the budgets differ), over compare.seeds seeds; "
                    "writes comparison.md/json into OUTPUT_DIR/compare. Finished stages are reused.")
    parser.add_argument("recipe", help="path to a recipe YAML file, e.g. recipes/cpu_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override recipe values, type-checked like the file (e.g. compare.seeds=5)")
    args = parser.parse_args(argv)
    from frugal_spin.config import load_recipe
    from frugal_spin.distributed import launched

    if launched():
        raise UserError("compare runs in one process: start it with python -m frugal_spin compare, not torchrun")
    recipe = load_recipe(args.recipe, args.overrides)
    from frugal_spin.ui import quiet_libraries

    quiet_libraries()
    from frugal_spin.compare import run_compare

    run_compare(recipe, command=" ".join(["python -m frugal_spin compare", args.recipe, *args.overrides]))
    return 0


def export_main(argv: list[str]) -> int:
    from frugal_spin.export import export_main as main_

    return main_(argv)


def sample_main(argv: list[str]) -> int:
    from frugal_spin.sample import sample_main as main_

    return main_(argv)


def build_base_main(argv: list[str]) -> int:
    from frugal_spin.tiny_base import build_base_main as main_
    from frugal_spin.ui import quiet_libraries

    quiet_libraries()
    return main_(argv)


SUBCOMMANDS = {"report": report_main, "plan": plan_main, "compare": compare_main, "export": export_main,
               "sample": sample_main, "build-base": build_base_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else run_main(argv)
    except UserError as exc:
        from frugal_spin.distributed import current

        line = current().error_line(exc)  # with several ranks: said once, by the rank that knows why
        if line is not None:
            print(line, file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        from frugal_spin.io import disk_full_message, is_disk_full

        if exc.errno == errno.ENAMETOOLONG:  # a path from the command line the checks did not see (export, sample)
            from frugal_spin.config import short

            print(f"error: a path is too long for the filesystem: {short(str(exc.filename))}", file=sys.stderr)
            return 2
        if not is_disk_full(exc):
            raise
        # A full disk anywhere else (a library's own write): one line with the file when the error names it.
        print(f"error: {disk_full_message(Path(exc.filename or '.'), None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
