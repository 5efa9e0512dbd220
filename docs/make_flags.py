"""Writes docs/flags.md, every flag of train_inversion_dpo.py by group, from the trainer's own parser (its --help):

    python docs/make_flags.py            # rewrite docs/flags.md
    python docs/make_flags.py --check    # exit 1 when docs/flags.md is out of date (tests/test_docs.py runs this)
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flags.md"


def default_text(action):
    if action.default is None or action.default is argparse.SUPPRESS:
        return "—"
    if action.default is False and action.nargs == 0:
        return "off"
    if isinstance(action.default, (list, tuple)):
        return " ".join(str(v) for v in action.default)
    return str(action.default)


def flags_page():
    sys.path.insert(0, str(ROOT))
    from arguments import build_parser

    parser = build_parser()
    lines = ["# Every flag of train_inversion_dpo.py", "",
             "[Back to the README](../README.md). Generated from the trainer's parser by `python docs/make_flags.py`; "
             "`tests/test_docs.py` fails when this page and `--help` differ.", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title[0].upper()}{group.title[1:]}", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{name}`" for name in action.option_strings)
            meaning = " ".join((action.help or "").split())
            if action.choices:
                meaning += f" Choices: {', '.join(str(c) for c in action.choices)}."
            if action.required:
                meaning += " Required."
            lines.append(f"| {names} | {default_text(action)} | {meaning.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    page = flags_page()
    if "--check" in sys.argv[1:]:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != page:
            sys.exit(f"{PAGE} is out of date: run python docs/make_flags.py")
        sys.exit(0)
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
