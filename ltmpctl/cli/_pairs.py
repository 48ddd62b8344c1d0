"""timm's `--model-kwargs img_size=32 patch_size=4` form: several key=value pairs after one flag.

Click options take one value each, so the command line is rewritten before Click parses it: every `key=value`
word that follows a pairs option (or another such word) gets the flag put back in front of it, giving the repeated
form Click understands. A word only counts as a pair when it starts with an identifier and `=`, so run
directories and file paths (`runs/x`, `a/b=c`) that follow stay positional arguments.
"""
from __future__ import annotations

import re
from typing import Sequence

import click
from typer.core import TyperCommand

PAIR_OPTIONS = ("--model-kwargs",)
_PAIR = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")


def expand_pairs(args: Sequence[str], options: Sequence[str] = PAIR_OPTIONS) -> list[str]:
    """`--model-kwargs a=1 b=2` -> `--model-kwargs a=1 --model-kwargs b=2` (also after `--model-kwargs=a=1`)."""
    out: list[str] = []
    current = None  # the pairs option the previous word belonged to
    pending_value = False  # the option itself was the last word: its value comes next
    for i, word in enumerate(args):
        if word == "--" and not pending_value:  # everything after is positional, as Click treats it
            return [*out, *args[i:]]
        if pending_value:
            out.append(word)
            pending_value = False
            continue
        if word in options:
            current, pending_value = word, True
            out.append(word)
            continue
        flag = next((o for o in options if word.startswith(o + "=")), None)
        if flag is not None:
            current = flag
            out.append(word)
            continue
        if current is not None and _PAIR.match(word):
            out += [current, word]
            continue
        current = None
        out.append(word)
    return out


class PairsCommand(TyperCommand):
    """A Typer command whose pairs options (PAIR_OPTIONS) also take several values after one flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_pairs(args))
