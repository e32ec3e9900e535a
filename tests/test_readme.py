"""Every ```python snippet in README.md and docs/*.md runs as written.

Each snippet runs alone, in a fresh namespace (so a missing import fails it), in a working
directory that holds narrow random checkpoints under the names the snippets use
(``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``: the real tensor names, 8 channels wide). A snippet that
needs what a test cannot give (a broker, a GPU) is preceded in the Markdown by
``<!-- readme-test: skip REASON -->``; the test fails on a skip without a reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import random_wan_state_dict, scaled_keys, wan21_keys, wan22_keys

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(
    r"(?:<!-- readme-test: skip(?P<reason>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


def snippets() -> list[tuple[str, str, str | None]]:
    """``(id, code, skip reason)`` of every python snippet, ``id`` = file:line."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in SNIPPET.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            reason = match["reason"]
            found.append((f"{document.name}:{line}", match["code"], reason and reason.strip()))
    return found


SNIPPETS = snippets()


def test_the_documents_have_snippets():
    assert len(SNIPPETS) >= 4
    for name, _, reason in SNIPPETS:
        assert reason is None or reason, f"{name}: a skipped snippet must say why"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    narrow21 = scaled_keys(wan21_keys(), 96, 96, 8, 8)
    torch.save(random_wan_state_dict(seed=0, keys=narrow21), folder / "Wan2.1_VAE.pth")
    narrow22 = scaled_keys(wan22_keys(), 160, 256, 8, 8)
    torch.save(random_wan_state_dict(seed=1, keys=narrow22), folder / "Wan2.2_VAE.pth")
    return folder


@pytest.mark.parametrize(
    ("code", "reason"), [s[1:] for s in SNIPPETS], ids=[s[0] for s in SNIPPETS]
)
def test_snippet_runs(code: str, reason: str | None, checkpoints: Path, monkeypatch, capsys):
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(checkpoints)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
    capsys.readouterr()


def command_lines() -> list[tuple[str, list[str]]]:
    """``(file:line, words)`` of every ``streamvae ...`` command in the documents' bash blocks
    (continuation lines joined, comments and ``cmd && `` prefixes cut)."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first = text.count("\n", 0, block.start(1)) + 1
            joined = block[1].replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                for part in line.split("#", 1)[0].split("&&"):
                    words = part.split()
                    if words[:1] == ["streamvae"]:
                        found.append((f"{document.name}:{first + offset}", words[1:]))
    return found


def test_documented_commands_and_options_exist():
    """Every command and ``--option`` the documents show is one the CLI has."""
    import argparse

    from streamvae.cli import build_parser

    lines = command_lines()
    assert len(lines) >= 8
    problems = []
    for where, words in lines:
        parser = build_parser()
        path = []
        for word in words:
            subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subcommands or word not in subcommands[0].choices:
                break
            parser = subcommands[0].choices[word]
            path.append(word)
        if not path:
            problems.append(f"{where}: no such command: streamvae {words[0]}")
            continue
        options = {s for a in parser._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", " ".join(words[len(path) :])):
            if flag not in options:
                problems.append(f"{where}: streamvae {' '.join(path)} has no option {flag}")
    assert not problems, "\n".join(problems)


def test_the_readmes_test_command_is_what_ci_runs():
    """The Quick start's check-and-test command is the one `.ci/run` runs, part by part."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the checks and the tests.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "the README's Quick start has no test command"
    parts = [part.strip() for part in block[1].split("&&")]
    ci = (ROOT / ".ci" / "run").read_text()
    for part in parts:
        assert re.search(rf"^\s*{re.escape(part)}(?=\s|$)", ci, re.M) or f"&& {part}" in ci, part
    assert parts[-1] == "python3 -m pytest"
