"""`hf-safety-merge methods`: the merge methods with their parameters."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    me = subparsers.add_parser("methods", help="list merge methods with their parameters (types, ranges, defaults, meanings)")
    me.set_defaults(func=run)
    return me


def run(args: argparse.Namespace) -> int:
    from ..methods.base import available_methods
    from ..methods.describe import describe_method

    for name in available_methods():
        print(describe_method(name))
        print()
    return 0
