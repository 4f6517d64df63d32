"""trl_banel: BaNEL (Bayesian Negative Evidence Learning) for TRL."""

__version__ = "0.1.0"

from .versions import check_versions  # noqa: E402

check_versions()  # an untested trl, transformers or peft fails here, by name

from .config import BaNELConfig  # noqa: E402
from .ledger import RewardFunctionError, RewardLedger  # noqa: E402
from .report import plot_run_report  # noqa: E402
from .trainer import BaNELTrainer  # noqa: E402

__all__ = ["BaNELConfig", "BaNELTrainer", "RewardLedger", "RewardFunctionError", "plot_run_report", "__version__"]
