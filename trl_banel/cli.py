"""Command-line helpers shared by the recipes and benchmarks."""

import argparse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag (as HfArgumentParser shows them) and the description's own line breaks."""


def script_help(doc: str) -> dict:
    """Parser keyword arguments so that `--help` starts with the script's docstring, whose first line says what it
    does, instead of a usage line listing every TrainingArguments flag."""
    return {"description": doc.strip(), "usage": argparse.SUPPRESS, "formatter_class": _HelpFormatter}
