"""`python -m app.cluster probe ...` (the learner pod's exec probe) and every other command."""
from __future__ import annotations

import argparse
import sys

from app.cluster import HELP, add_arguments, main


def _standalone(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cluster", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from crl import config as C
    try:
        return main(args)
    except C.ConfigError as e:
        print(f"crl cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())
