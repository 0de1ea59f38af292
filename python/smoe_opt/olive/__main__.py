"""``python -m smoe_opt.olive WORKFLOW.json``: run an Olive workflow with ``SmoeOpt`` registered."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .workflow import run_workflow, write_package_config


def main(argv: Optional[list] = None) -> int:
    """``python -m smoe_opt.olive WORKFLOW.json`` / ``--write-package-config PATH``."""
    parser = argparse.ArgumentParser(
        prog="python -m smoe_opt.olive", description="Run an Olive workflow that uses the SmoeOpt pass."
    )
    parser.add_argument("workflow", nargs="?", help="Olive workflow JSON")
    parser.add_argument(
        "--write-package-config",
        metavar="PATH",
        help="write Olive's package config with SmoeOpt added (for `olive run --package-config`)",
    )
    args = parser.parse_args(argv)
    if args.write_package_config:
        write_package_config(args.write_package_config)
    if args.workflow:
        run_workflow(args.workflow)
    elif not args.write_package_config:
        parser.error("give a workflow JSON or --write-package-config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
