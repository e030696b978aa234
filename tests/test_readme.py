"""The README agrees with the command line: its option tables list every option of every command, and every
`anitalker ...` example in it parses and asks only for outputs the README's own install provides."""
from __future__ import annotations

import argparse
import re
import shlex

import pytest

from conftest import ROOT
from streaming.cli import build_parser

README = (ROOT / "README.md").read_text()
COMMANDS = ["render", "live", "reenact", "download"]


def subparsers() -> dict:
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def table_options() -> set:
    """Every option named in the first cell of a README table row."""
    found = set()
    for line in README.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            found |= set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", first))
            found |= {"infer_types"} if "TYPE" in first else set()
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_option_tables_list_every_option(command):
    listed = table_options()
    options = {s for a in subparsers()[command]._actions if a.dest != "help"
               for s in (a.option_strings or [a.dest])}
    assert options - listed == set(), f"`{command}` options missing from the README tables"
    assert "--debug" in listed


def examples() -> list[str]:
    """The `anitalker ...` command lines in the README's code blocks (continuations joined, comments cut)."""
    out, blocks, inside = [], [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
            blocks += [[]] if inside else []
        elif inside:
            blocks[-1].append(line)
    for block in blocks:
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if re.match(r"\s*(\S*/)?anitalker(\s|$)", part):
                    out.append(shlex.split(part, comments=True)[1:])
    return out


EXAMPLES = examples()


def test_the_readme_has_examples_of_every_command():
    assert {e[0] for e in EXAMPLES if e} >= {"render", "live", "reenact", "download", "devices"}


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(e) for e in EXAMPLES])
def test_every_example_parses_and_needs_nothing_the_install_lacks(argv):
    from avatar.media import CONTAINERS

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`anitalker {' '.join(argv)}` does not parse")
    outs = [o.split(":")[0] for o in (getattr(args, "to", None) or "").split(",") if o]
    # a window needs OpenCV's GUI build, which the README's install (`bash install.sh`) does not put in
    assert set(outs) <= {"vcam", "webrtc", "speaker", "file", "null"}, argv
    for path in [getattr(args, "output", None)] + [o[5:] for o in (getattr(args, "to", None) or "").split(",")
                                                   if o.startswith("file:")]:
        assert path is None or any(path.endswith(ext) for ext in CONTAINERS), argv
