"""trl_banel: BaNEL (Bayesian Negative Evidence Learning) for TRL."""

__version__ = "0.1.0"

# The trainer builds on TRL's private base classes, which can move between releases: fail early and clearly on a
# TRL outside the tested range instead of deep in a stack trace.
def _check_trl():
    from importlib.metadata import version

    from packaging.version import Version

    v = Version(version("trl"))
    if not (Version("1.16.0") <= v < Version("1.17")):
        raise ImportError(
            f"trl_banel {__version__} is tested with trl>=1.16,<1.17 but trl {v} is installed; install "
            "'trl>=1.16,<1.17' (pip install 'trl>=1.16,<1.17')."
        )
    try:
        from trl.trainer.base_config import _BaseConfig  # noqa: F401
        from trl.trainer.base_trainer import _BaseTrainer  # noqa: F401
    except ImportError as e:  # pragma: no cover - only on a moved TRL
        raise ImportError(f"trl {v} no longer provides the trainer base classes trl_banel builds on: {e}") from e


_check_trl()

from .config import BaNELConfig  # noqa: E402
from .ledger import RewardFunctionError, RewardLedger  # noqa: E402
from .report import plot_run_report  # noqa: E402
from .trainer import BaNELTrainer  # noqa: E402

__all__ = ["BaNELConfig", "BaNELTrainer", "RewardLedger", "RewardFunctionError", "plot_run_report", "__version__"]
