"""The README's shell examples can be pasted: every file a `duccio-fx` line names exists in the repository
or is made by an earlier line (a `cp`, an `--out` directory)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shell_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```console")
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.split("  #")[0].strip())
    return lines


def test_readme_commands_name_files_that_exist():
    made: set[str] = set()
    missing = []
    for line in _shell_lines((ROOT / "README.md").read_text()):
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[:1] == ["cp"] and len(words) == 3:
            made.add(words[2])
        if "--out" in words:
            made.add(words[words.index("--out") + 1].rstrip("/"))
        if words[:1] != ["duccio-fx"]:
            continue
        for word in words[1:]:
            if re.fullmatch(r"[\w./-]+\.(py|toml)", word) and not (ROOT / word).exists() and word not in made:
                missing.append(f"{line!r}: {word}")
            if re.fullmatch(r"runs/\w+", word) and word not in made:
                missing.append(f"{line!r}: {word} (no earlier line makes it)")
    assert not missing, "README examples that fail when pasted:\n" + "\n".join(missing)


def test_no_file_points_to_documents_outside_the_repository():
    """Docs and comments cite sources a reader can open (the README, papers, upstream repositories)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (e.g. an sdist): nothing to check
        return
    offenders = [f for f in files if f.endswith((".py", ".md", ".toml"))
                 and re.search(r"DESIGN\.md|\.\./shared", (ROOT / f).read_text(errors="ignore"))
                 and f != "tests/test_readme.py"]
    assert not offenders, offenders


def test_the_readme_never_asks_for_sudo():
    """Install lines are pasted as they are; a root install is the user's choice, not the README's."""
    text = (ROOT / "README.md").read_text()
    assert not re.search(r"\bsudo\b", text), [line for line in text.splitlines() if "sudo" in line]
