"""``cqkd COMMAND [ARGS ...]``: one command for every job.

Each command takes exactly the arguments of the ``python -m`` entry point it
names (those keep working) and hands them to that entry point's ``main``;
``cqkd COMMAND --help`` shows them. The job modules are imported only when
their command runs, so ``cqkd --help`` answers at once. A user-facing error
(:class:`dataset_tools.errors.CqkdError`) that reaches this level is printed
in one line (``CQKD_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # whose main(argv) runs the command
    leading: tuple  # arguments put before the user's (the job or sub-command)
    same_as: str  # the python -m form it equals
    help: str


TRAINER = "trainer.__main__"
COMMANDS = {
    "convert": Command("dataset_tools.convert", (), "python dataset_tools/convert.py",
                       "convert a dataset (ImageFolder, tar, CIFAR, HDF5) into FFCV/DALI stores"),
    "verify": Command("dataset_tools.verify", (), "python dataset_tools/convert.py verify",
                      "check a converted store against its manifest"),
    "teacher": Command(TRAINER, ("teacher",), "python -m trainer teacher",
                       "train the full-resolution teacher"),
    "calibrate": Command(TRAINER, ("calibrate",), "python -m trainer calibrate",
                         "fit the teacher's temperature on the validation split"),
    "cache": Command(TRAINER, ("cache",), "python -m trainer cache",
                     "fill the teacher cache (logits + embeddings of K views)"),
    "sweep": Command(TRAINER, ("sweep",), "python -m trainer sweep",
                     "choose the KD temperature and objective on the validation split"),
    "distill": Command(TRAINER, ("distill",), "python -m trainer distill",
                       "train a low-resolution student"),
    "evaluate": Command(TRAINER, ("evaluate",), "python -m trainer evaluate",
                        "accuracy and calibration of a checkpoint on the test split"),
    "demo": Command("benchmarks.demo", (), "python -m benchmarks.demo",
                    "the whole pipeline end to end, with its report (make demo)"),
    "bench": Command("benchmarks.__main__", ("run",), "python -m benchmarks run",
                     "run benchmark suites, write one JSON"),
    "compare": Command("benchmarks.__main__", ("compare",), "python -m benchmarks compare",
                       "compare two benchmark JSONs; exit 1 on a regression"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cqkd")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {c.help} (= {c.same_as})" for name, c in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="cqkd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cross-quality knowledge distillation: calibrated low-resolution students "
                    "from a full-resolution teacher.",
        epilog=f"commands:\n{listing}\n\n'cqkd COMMAND --help' shows a command's arguments; "
               f"'cqkd distill --help-config' (any trainer job) lists every config key.")
    p.add_argument("--version", action="version", version=f"cqkd {version()}")
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS),
                   help="one of: " + ", ".join(COMMANDS))
    return p


@contextlib.contextmanager
def _program_name(name: str):
    """``sys.argv[0]`` as ``name`` while a command runs, so the parsers that
    name themselves after it print ``usage: cqkd convert ...``."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    try:
        yield
    finally:
        if sys.argv:
            sys.argv[0] = saved


def run(name: str, args: list[str]) -> int:
    """Run command ``name`` with the user's ``args``; its exit status."""
    from dataset_tools.errors import CqkdError, exit_with_error

    cmd = COMMANDS[name]
    main = importlib.import_module(cmd.module).main
    argv = [*cmd.leading, *args]
    try:
        with _program_name(f"cqkd {name}"):
            status = main(argv, prog="cqkd") if cmd.module == TRAINER else main(argv)
    except CqkdError as e:  # one the command's own handler let through
        return exit_with_error(e)
    return int(status or 0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in COMMANDS:
            return run(argv[0], argv[1:])
        parser = _parser()
        if argv and not argv[0].startswith("-"):
            from dataset_tools.settings import close_matches

            near = close_matches(argv[0], COMMANDS)
            parser.error(f"unknown command {argv[0]!r}"
                         + (f" (did you mean {near[0]!r}?)" if near else "")
                         + f"; commands: {', '.join(COMMANDS)}")
        parser.parse_args(argv)  # --help, --version; exits
        return 2
    except BrokenPipeError:  # cqkd ... | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
