"""Command-line helpers shared by the recipes and benchmarks."""

import argparse
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


def write_results(result: dict, path: Optional[str], indent: int = 1) -> None:
    """Write a script's results file (its folder created), if a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=indent) + "\n")
