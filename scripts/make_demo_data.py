"""Regenerate data/demo/train.jsonl and eval.jsonl (deterministic: the output never changes)."""

from pathlib import Path

from lora_dpo.demo import write_demo_data

if __name__ == "__main__":
    for path in write_demo_data(Path(__file__).resolve().parent.parent / "data" / "demo"):
        print(path)
