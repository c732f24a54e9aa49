"""Principles for ``collect revise`` and ``collect judge``: read, checked, and drawn per prompt.

A principles file (YAML) holds ``principles``, each with ``name``, ``critique`` (the critique
request), ``revision`` (the revision request) and ``choice`` (the judge's question), and
``examples``: worked rounds (``principle``, ``prompt``, ``answer``, ``critique``, ``revision``)
shown to the model before its own. Every text goes through the training data's text checks
(empty, lone surrogates), unknown keys are refused with their name. The default file ships in
this package (``principles.yaml``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError
from ..records import content_hash
from .common import check_text

DEFAULT_PRINCIPLES = Path(__file__).with_name("principles.yaml")
PRINCIPLE_KEYS = ("name", "critique", "revision", "choice")
EXAMPLE_KEYS = ("principle", "prompt", "answer", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    choice: str


@dataclass(frozen=True)
class Example:
    principle: Principle
    prompt: str
    answer: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Principles:
    principles: list[Principle]
    examples: list[Example]
    source: str

    def draw(self, seed: int, prompt_index: int) -> int:
        """The principle a prompt starts with: random per prompt, the same on every run."""
        return random.Random(f"{seed}/{prompt_index}/principle").randrange(len(self.principles))

    def fingerprint(self) -> str:
        return content_hash([[p.name, p.critique, p.revision, p.choice] for p in self.principles]
                            + [[e.principle.name, e.prompt, e.answer, e.critique, e.revision] for e in self.examples])


def load_principles(path: Optional[str] = None, flag: str = "--principles") -> Principles:
    import yaml

    file = Path(path) if path else DEFAULT_PRINCIPLES
    where = f"{flag} {file}"
    if not file.is_file():
        raise DataError(f"{where}: file not found. Fix: check the path, or leave {flag} out for the shipped principles")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:120]}). Fix: correct it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("principles"), list) or not raw["principles"]:
        raise DataError(f"{where}: needs a non-empty 'principles:' list. Fix: see {DEFAULT_PRINCIPLES.name} in the "
                        "lora_dpo.collect package for the shape")
    extra = sorted(set(raw) - {"principles", "examples"})
    if extra:
        raise DataError(f"{where}: unknown key {extra[0]} (known: principles, examples). Fix: remove it")
    principles = [Principle(**_fields(item, PRINCIPLE_KEYS, f"{where}: principles[{i}]"))
                  for i, item in enumerate(raw["principles"])]
    names = {p.name: p for p in principles}
    if len(names) != len(principles):
        raise DataError(f"{where}: two principles share a name. Fix: give each its own name")
    examples = []
    for i, item in enumerate(raw.get("examples") or []):
        values = _fields(item, EXAMPLE_KEYS, f"{where}: examples[{i}]")
        if values["principle"] not in names:
            raise DataError(f"{where}: examples[{i}].principle {values['principle']} names no principle (known: "
                            f"{', '.join(names)}). Fix: correct it")
        values["principle"] = names[values["principle"]]
        examples.append(Example(**values))
    return Principles(principles, examples, str(file))


def _fields(item: Any, keys: tuple[str, ...], where: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: must be a mapping with {', '.join(keys)}. Fix: correct it")
    unknown = sorted(set(map(str, item)) - set(keys))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]} (known: {', '.join(keys)}). Fix: correct or remove it")
    missing = [key for key in keys if key not in item]
    if missing:
        raise DataError(f"{where}: missing {missing[0]}. Fix: add it")
    return {key: check_text(item[key], f"{where}.{key}") for key in keys}
