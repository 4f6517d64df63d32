"""`python -m trl_banel report OUTPUT_DIR`: draw the report figure of a finished run."""

import sys

from .report import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["report"]:
        sys.exit("usage: python -m trl_banel report OUTPUT_DIR [--out PATH]")
    main(sys.argv[2:])
