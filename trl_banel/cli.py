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
