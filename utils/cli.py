"""Small pieces the command-line scripts (train.py, test.py, demo.py) share."""
import argparse
import sys
from typing import Any


def one_paragraph(err: BaseException | str, limit: int = 4000) -> str:
    """An exception's message on one line (long key lists cut at ``limit`` characters)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


class _RenamedFlag(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated, use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str,
                     **kwargs: Any) -> None:
    """Keep accepting ``old``, the former spelling of ``new`` (same destination, hidden from
    --help), with one line on stderr when it is used. ``kwargs``: ``type`` / ``nargs`` of ``new``."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_RenamedFlag, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)
