"""Shared fixtures: tiny random-init models and the project's own tokenizer, built once per session.

Nothing here touches the network: the models are built from configs and saved to a temporary
directory, and HF_HUB_OFFLINE makes any accidental hub access fail fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the demo tokenizer, saved with save_pretrained."""
    from lora_dpo.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("llama"), arch="llama", hidden_size=64, layers=2, seed=0)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 (biases on q/k/v) with the demo tokenizer."""
    from lora_dpo.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("qwen"), arch="qwen2", hidden_size=64, layers=2, seed=1)


@pytest.fixture(scope="session")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_config(model_dir: Path, train_file: Path, out_dir: Path, *overrides: str):
    """A small, fast config for the tiny models; extra key=value overrides win."""
    from lora_dpo.config import load_config

    base = [
        f"model.name_or_path={model_dir}",
        f"data.train_file={train_file}",
        f"output.dir={out_dir}",
        "data.max_length=128",
        "data.max_prompt_length=48",
        "lora.r=8",
        "lora.dropout=0.0",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.max_steps=3",
        "train.optim=adamw",
        "train.learning_rate=1e-3",
        "output.report=false",  # plotting costs seconds per run; tests/test_report.py turns it on
    ]
    if any(o.startswith("model.init_adapter=") and o != "model.init_adapter=null" for o in overrides):
        base = [b for b in base if not b.startswith("lora.")]  # the adapter's own config decides its shape
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def demo_rows():
    from lora_dpo.demo import TRAIN_TOPICS, demo_pairs

    return demo_pairs(TRAIN_TOPICS, 32, seed=3)


# Documentation command blocks that the tests run (tests/test_docs.py): a fenced block right after
# this marker line, in README.md or docs/*.md.
DOC_TEST_MARKER = "<!-- test: cpu -->"


def marked_doc_blocks() -> list[tuple[str, int, list[str]]]:
    """(file, line of the block's first command, commands) of every marked block."""
    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.strip() != DOC_TEST_MARKER:
                continue
            assert lines[number + 1].startswith("```"), f"{path.name}:{number + 1}: the marker must precede a fence"
            end = next(i for i in range(number + 2, len(lines)) if lines[i].startswith("```"))
            commands = [text for text in lines[number + 2:end] if text.strip() and not text.lstrip().startswith("#")]
            blocks.append((str(path.relative_to(REPO)), number + 3, commands))
    return blocks


def run_doc_command(command: str, cwd: Path) -> int:
    """A documented command as a user types it in ``cwd``: ``lora-dpo ...`` runs in-process (an
    import of torch per command would cost seconds), anything else through bash."""
    import contextlib
    import shlex
    import subprocess

    words = shlex.split(command, comments=True)
    if words[0] != "lora-dpo":
        return subprocess.run(["bash", "-c", command], cwd=cwd).returncode
    from lora_dpo.cli import main

    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.suppress(SystemExit):
            return main(words[1:])
        return 2
    finally:
        os.chdir(before)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's marked demo block, run once in a fresh directory holding the repository's
    configs/ and data/ as a clone does: (that directory, what it printed). Shared by the tests
    that need a trained demo, so the suite pre-trains and trains the demo model once."""
    import contextlib
    import io

    (readme_block,) = [commands for name, _, commands in marked_doc_blocks() if name == "README.md"]
    assert readme_block == ["lora-dpo demo"]
    work = tmp_path_factory.mktemp("demo-work")
    for name in ("configs", "data"):
        (work / name).symlink_to(REPO / name)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_doc_command(readme_block[0] + " --no-progress", work)
    assert code == 0, printed.getvalue()
    return work, printed.getvalue()
