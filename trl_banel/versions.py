"""The library versions trl_banel is tested with, checked when it is imported.

The trainer builds on TRL's private base classes, and `trl_banel.adapters` on peft's and transformers' internals: all
can move between releases. An untested version fails at import, by name, instead of deep in a stack trace. The
ranges are those of `pyproject.toml` (`tests/test_versions.py` keeps the two equal).
"""

from importlib import metadata

from packaging.version import Version

# package: (lowest tested, first untested)
TESTED_VERSIONS = {
    "trl": ("1.16", "1.17"),
    "transformers": ("5.0", "5.24"),
    "peft": ("0.17", "0.22"),
}


def check_versions() -> None:
    """Raise an `ImportError` naming the package when an installed version lies outside `TESTED_VERSIONS`."""
    from trl_banel import __version__

    for package, (low, high) in TESTED_VERSIONS.items():
        installed = Version(metadata.version(package))
        if not Version(low) <= installed < Version(high):
            spec = f"{package}>={low},<{high}"
            raise ImportError(f"trl_banel {__version__} is tested with {spec} but {package} {installed} is "
                              f"installed; install '{spec}' (pip install '{spec}').")
    try:
        from trl.trainer.base_config import _BaseConfig  # noqa: F401
        from trl.trainer.base_trainer import _BaseTrainer  # noqa: F401
    except ImportError as e:  # pragma: no cover - only on a moved TRL
        raise ImportError(f"trl {metadata.version('trl')} no longer provides the trainer base classes trl_banel "
                          f"builds on: {e}") from e
