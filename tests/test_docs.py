"""The documentation: the README is a front door (short, linking every page), docs/flags.md is what --help says,
and every link between the pages resolves."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_flags_page_is_generated_from_the_current_parser():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "make_flags.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_flags_page_names_every_flag_of_the_help(capsys):
    import pytest

    from train_inversion_dpo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    flags = set(re.findall(r"(--[a-z0-9_]+)", capsys.readouterr().out)) - {"--help"}
    page = (ROOT / "docs" / "flags.md").read_text()
    assert len(flags) > 50 and sorted(flag for flag in flags if f"`{flag}`" not in page) == []


def test_the_readme_is_a_front_door_linking_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    linked = set(re.findall(r"\]\((docs/[\w.]+\.md)\)", readme))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()


def test_every_relative_link_resolves():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
