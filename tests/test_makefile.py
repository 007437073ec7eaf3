"""The Makefile explains itself: ``make help`` lists every target the Makefile defines
with the first line of its help (a ``## `` comment on the rule line or just above
it), and the container targets say in one line what to install when they cannot.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = REPO_ROOT / "Makefile"
# A rule's targets: names, not a variable ($(INSTALLED)), a special target (.PHONY) or a
# pattern (%.o); not an assignment (:=, ::=); no double-colon rule.
RULE = re.compile(r"^([A-Za-z0-9][\w.-]*(?:[ \t]+[A-Za-z0-9][\w.-]*)*)[ \t]*:(?![:=])")
# Targets a newcomer is pointed at; each must exist and have help.
EXPECTED = {"setup", "serve", "register", "test", "lint", "format", "container",
            "container-test", "container-tools", "bench", "bench-gpu", "bench-peers",
            "bench-soak", "browser", "clean", "help"}  # fmt: skip


def defined_targets(makefile: Path) -> set[str]:
    """Every target a rule of ``makefile`` names, outside ``define`` blocks and recipes."""
    targets: set[str] = set()
    in_define = False
    for line in makefile.read_text().splitlines():
        if re.match(r"^define\b", line):
            in_define = True
        elif line.startswith("endef"):
            in_define = False
        elif not in_define and not line.startswith("\t") and (match := RULE.match(line)):
            targets.update(match.group(1).split())
    return targets


def make_help(makefile: Path = MAKEFILE) -> dict[str, str]:
    """``make help``'s targets and their descriptions."""
    result = subprocess.run(["make", "-s", "-f", str(makefile), "help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    listed = {}
    for line in result.stdout.splitlines()[1:]:
        name, _, description = line.strip().partition(" ")
        listed[name] = description.strip()
    return listed


def test_every_target_is_listed_with_a_description():
    targets = defined_targets(MAKEFILE)
    assert targets >= EXPECTED, EXPECTED - targets
    listed = make_help()
    assert set(listed) == targets
    assert not [name for name in targets if not listed[name]], "targets without help"


def test_a_target_added_later_with_help_is_listed(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(
        MAKEFILE.read_text()
        + "\nshiny: ## a target added later\n\t@true\n"
        + "\n## another, its help above the rule\n# (more about it)\nplain other:\n\t@true\n"
    )
    listed = make_help(makefile)
    assert listed["shiny"] == "a target added later"
    assert listed["plain"] == listed["other"] == "another, its help above the rule"
    assert set(listed) == defined_targets(makefile)


def test_the_rule_parser_skips_files_variables_and_patterns(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(
        "X := 1\nY ::= 2\n$(X): a\n\ttouch $@\n%.o: %.c\n\ttrue\n.PHONY: real\n"
        "define macro\nnot: a rule\nendef\nreal: $(X) ## real\n\t@echo a: b\n"
    )
    assert defined_targets(makefile) == {"real"}


# --- the container tools ------------------------------------------------------------------


@pytest.fixture
def not_root(tmp_path) -> dict[str, str]:
    """An environment in which ``id -u`` answers 1000, as for an ordinary user."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO_ROOT).returncode != 0:
        pytest.skip(".venv is not up to date: make would rebuild it first")
    return subprocess.run(["make", "-s", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def our_lines(stderr: str) -> list[str]:
    """stderr without make's own closing line (``make: *** [...] Error 1``)."""
    return [line for line in stderr.splitlines() if not line.startswith("make")]


def test_make_container_without_the_tools_or_root_says_what_to_install_and_stops(not_root):
    result = run_make("container", "CONTAINER_TOOLS=no-such-tool-here", env=not_root)
    assert result.returncode != 0
    assert our_lines(result.stderr) == [
        "not installed: no-such-tool-here; installing them needs root "
        "(apt-get install no-such-tool-here): make container stops here."
    ]
    assert "registering" not in result.stdout  # stopped before anything else


def test_make_container_test_without_the_tools_or_root_says_so_and_skips(not_root):
    result = run_make("container-test", "CONTAINER_TOOLS=no-such-tool-here",
                      "IMAGE=no-such-image-here", env=not_root)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert our_lines(result.stderr) == [
        "not installed: no-such-tool-here; installing them needs root "
        "(apt-get install no-such-tool-here): the container tests will skip."
    ]
    assert re.search(r"\d+ skipped", result.stdout), result.stdout
