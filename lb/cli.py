"""The ``lb`` command: ``lb check -c FILE`` validates a config like ``nginx -t``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from lb import config as lbconfig


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", default="etc/lb.yaml")
    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            config = lbconfig.load(args.config)
        except lbconfig.ConfigError as e:
            for line in e.lines():
                print(line, file=sys.stderr)
            return 1
        # a file name Python decoded with surrogates would make print() raise
        print(f"{lbconfig.one_line(args.config)}: {config.summary()}")
        return 0
    return 2  # pragma: no cover (argparse rejects unknown commands)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
