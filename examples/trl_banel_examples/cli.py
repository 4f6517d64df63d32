"""Command-line helpers shared by the recipes and benchmarks."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag (as HfArgumentParser shows them) and the description's own line breaks."""


def script_help(doc: str) -> dict:
    """Parser keyword arguments so that `--help` starts with the script's docstring, whose first line says what it
    does, instead of a usage line listing every TrainingArguments flag."""
    return {"description": doc.strip(), "usage": argparse.SUPPRESS, "formatter_class": _HelpFormatter}


def apply_quick(argv: Optional[Sequence[str]], quick: dict, *targets) -> None:
    """`--quick`: set each of `quick`'s values that the command line did not give, on the first of `targets` (parsed
    dataclasses) that has the field."""
    argv = sys.argv[1:] if argv is None else argv
    explicit = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
    for key, value in quick.items():
        if key not in explicit:
            setattr(next(t for t in targets if hasattr(t, key)), key, value)


def retyped_command(script: str, argv: Sequence[str]) -> str:
    """A recipe's command as a reader would retype it; where the files went (`--output_dir`) changes no number, so it
    is left out."""
    import shlex

    shown = [a for i, a in enumerate(argv)
             if not a.startswith("--output_dir") and not (i and argv[i - 1] == "--output_dir")]
    return shlex.join(["python", script, *shown])


def hardware() -> str:
    """The machine as a recipe's summary reports it: physical CPU cores and torch threads."""
    import psutil
    import torch

    threads = torch.get_num_threads()
    return f"{psutil.cpu_count(logical=False)} CPU cores, {threads} torch thread{'s' if threads > 1 else ''}"


def parse_recipe(args_cls, doc: str, defaults: dict, quick: dict, argv: Optional[Sequence[str]] = None):
    """A BaNEL recipe's `(args, config)`: `args_cls` (with a `quick` field) and `BaNELConfig` from the command line,
    `--help` starting with `doc`, the task's `defaults` under every flag; with `--quick`, `quick`'s values for those
    not given."""
    from trl import TrlParser

    from trl_banel.config import BaNELConfig

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = TrlParser((args_cls, BaNELConfig), **script_help(doc))
    parser.set_defaults(**defaults)
    args, config = parser.parse_args_and_config(argv)
    if args.quick:
        apply_quick(argv, quick, args, config)
        config.validate()
    return args, config


def write_results(result: dict, path: Optional[str], indent: int = 1, show: bool = False) -> None:
    """Write a script's results file (its folder created), if a path is given; `show` also prints it (without its
    `settings`)."""
    if show:
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=indent) + "\n")


def output_field(default, what: str):
    """A pretraining recipe's `--out`: where the models go; the default, the package's own folder, said in `--help`."""
    return dataclasses.field(default=str(default), metadata={
        "help": f"Folder the {what} written to. The default is the package's own folder: the run replaces the shipped "
                "models."})


def results_field(default, what: str = "Calibration results file"):
    """A recipe's `--results`: where its measurements go (by default the repository's results folder)."""
    return dataclasses.field(default=str(default), metadata={
        "help": f"{what} (the repository's results folder by default)."})


def parse_script_args(args_cls, doc: str):
    """A script's typed arguments from the command line, its `--help` starting with `doc` (see `script_help`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(args_cls, **script_help(doc)).parse_args_into_dataclasses()[0]
