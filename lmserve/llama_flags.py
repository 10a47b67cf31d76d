"""llama-server's flags on `lmserve serve` that are not its own options (the table,
llama_flag_table.py, says which): an accepted one parses, and start-up logs why it changes
nothing; a refused one stops parsing, naming the flag and why.
"""

from __future__ import annotations

import argparse

from lmserve.llama_flag_table import LLAMA_SERVER_FLAGS, LlamaFlag


def add_llama_flags(parser: argparse.ArgumentParser) -> None:
    """The accepted and refused flags, hidden from --help (the honoured ones are the parser's own
    options). Accepted ones are collected in `args.llama_accepted` as (flag as given, why)."""
    for flag in LLAMA_SERVER_FLAGS:
        if flag.kind != "honoured":
            parser.add_argument(*flag.spellings, action=_Accepted if flag.kind == "accepted" else _Refused, flag=flag)


class _Refused(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, flag: LlamaFlag, **kwargs) -> None:
        # Whatever follows is taken in: the flag stops parsing before anything else is read.
        super().__init__(option_strings, "llama_refused", nargs="*", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.flag = flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.exit(2, f"lmserve: {option_string} is a llama-server flag lmserve does not support: "
                       f"{self.flag.note}\n")


class _Accepted(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, flag: LlamaFlag, **kwargs) -> None:
        super().__init__(option_strings, "llama_accepted", nargs=1 if flag.takes_value else 0, default=(),
                         help=argparse.SUPPRESS)
        self.flag = flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = f"{option_string} {values[0]}" if values else option_string
        if self.flag.values is not None and values[0] not in self.flag.values:
            parser.exit(2, f"lmserve: {given} is a llama-server setting lmserve does not support: {self.flag.note} "
                           f"(it takes {option_string} {' or '.join(self.flag.values)})\n")
        setattr(namespace, self.dest, (*getattr(namespace, self.dest, ()), (given, self.flag.note)))
