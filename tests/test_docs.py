"""The documentation's command blocks marked ``<!-- test: cpu -->`` run as written, so the docs
cannot drift from the program. The README's demo block is the shared ``demo_run`` fixture; the
others run in its directory, after it, in file order."""

from __future__ import annotations

import pytest
from conftest import marked_doc_blocks, run_doc_command

BLOCKS = [block for block in marked_doc_blocks() if block[0] != "README.md"]


def test_the_docs_mark_their_cpu_commands():
    marked = {name for name, _, _ in marked_doc_blocks()}
    assert {"README.md", "docs/merge.md", "docs/config.md"} <= marked
    assert all(commands for _, _, commands in marked_doc_blocks())


@pytest.mark.parametrize("name, line, commands", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_marked_command_block_runs(demo_run, name, line, commands, capsys):
    work, _ = demo_run
    for offset, command in enumerate(commands):
        assert run_doc_command(command, work) == 0, f"{name}:{line + offset}: {command}\n{capsys.readouterr().err[-2000:]}"
