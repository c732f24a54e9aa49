"""Periodic samples during training (train.sample_every): a few fixed prompts answered at step 0
(before the first update: the reference's answers), every sample_every steps and at the last
step, appended to ``output.dir/samples.jsonl`` as rows
``{"step", "prompt_index", "prompt", "answer", "tokens"}``. The report shows how answers change.

The prompts are the first ``train.sample_prompts`` distinct prompts of the held-out pairs, as the
token ids training scored them with, or the first prompts of ``train.sample_file``
(``prompts.read_prompts``, encoded by ``data.encode_prompt`` as generation does). Answers come
from ``generation.sample`` with seeds from (train.seed, prompt index, 0): every step draws the same
random numbers for a prompt, so a change in its answer is the model's, and the global RNG that
orders the data is never touched (a run with samples trains exactly like one without).

Cost: one generation of sample_prompts x sample_max_new_tokens tokens each time, with the KV
cache; the model returns to training mode afterwards. Resuming drops the rows written after the
checkpoint (``keep_until``), so every step's answers are in the file once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoraDpoError
from .records import write_text_atomic
from .report import SAMPLES_FILE

log = logging.getLogger(__name__)


@dataclass
class SamplePrompts:
    indices: list[int]
    """Index of each prompt in the held-out pairs (or in sample_file): its key in the seeds."""
    texts: list[Any]
    """What the report shows: the prompt as given, or decoded from its token ids."""
    ids: list[list[int]]


def sample_prompts(config: Any, data: Any, tokenizer: Any) -> SamplePrompts | None:
    """The prompts train.sample_every answers; None when it is 0. Checked before the run writes
    anything: a bad sample_file or no prompt to sample is a one-line error."""
    train = config.train
    if not train.sample_every:
        return None
    if train.sample_file:
        from .data import encode_prompt
        from .prompts import read_prompts

        prompts = read_prompts(train.sample_file, source_option="train.sample_file")[: train.sample_prompts]
        return SamplePrompts([p.index for p in prompts], [p.text for p in prompts],
                             [encode_prompt(tokenizer, p.text) for p in prompts])
    if not data.eval:
        raise LoraDpoError("train.sample_every answers the held-out pairs' prompts, and there are none "
                           "(data.eval_fraction=0 and no data.eval_file). Fix: set train.sample_file to a prompt file, "
                           "or hold out pairs, or set train.sample_every=0")
    chosen: SamplePrompts = SamplePrompts([], [], [])
    seen: set[tuple[int, ...]] = set()
    for index, pair in enumerate(data.eval):
        key = tuple(pair.prompt_ids)
        if key in seen:
            continue
        seen.add(key)
        chosen.indices.append(index)
        chosen.texts.append(tokenizer.decode(pair.prompt_ids, skip_special_tokens=True).strip())
        chosen.ids.append(list(pair.prompt_ids))
        if len(chosen.indices) == train.sample_prompts:
            break
    return chosen


def sampling_settings(config: Any) -> Any:
    from .generation import SamplingSettings

    return SamplingSettings(max_new_tokens=config.train.sample_max_new_tokens,
                            temperature=config.train.sample_temperature, seed=config.train.seed)


def write_samples(model: Any, tokenizer: Any, prompts: SamplePrompts, config: Any, step: int, out: Path) -> None:
    """Answer the prompts with the model as it is at ``step`` and append the rows."""
    from .generation import sample

    answers = sample(model, tokenizer, prompts.ids, sampling_settings(config), prompt_indices=prompts.indices,
                     batch_size=2 * config.train.micro_batch_size)
    rows = [{"step": step, "prompt_index": index, "prompt": text, "answer": answer[0].text,
             "tokens": answer[0].num_tokens}
            for index, text, answer in zip(prompts.indices, prompts.texts, answers)]
    with (out / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def keep_until(out: Path, step: int) -> None:
    """Drop the rows of steps after ``step`` (written after the checkpoint a run resumes from) and
    a torn last line; the rest stays as it was."""
    path = out / SAMPLES_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(kept))
