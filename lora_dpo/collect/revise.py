"""``lora-dpo collect revise``: constitutional critique and revision (Constitutional AI's
supervised phase). The model answers each prompt; asked to critique its answer under a
principle, it critiques; asked to rewrite the answer to remove the problem, it revises. The pair:
chosen = the final revision, rejected = the first answer.

The turns are chat messages rendered with the model's own chat template (the same rendering as
training): first the worked examples of the principles file (few-shot: each a user prompt, the
answer, the critique request, the critique, the revision request and the revision), then the
prompt, the model's answer and the request. The first answer is sampled from the prompt alone,
so the rejected response is what the model says without help. With ``--rounds R`` the revision is
critiqued again under the next principle, R times; the principle of the first round is drawn per
prompt from (seed, prompt index).

Clean-up, which open models need (``clean_reply``): stop strings end a reply where the model
starts writing the next turn itself; preambles such as "Sure, here is a revised response:" and
labels such as "Revision:" are stripped, as are quotes around the whole reply. A prompt is
skipped, with its reason counted, when its first answer or its critique is empty, or its first
revision is empty, identical to the first answer, or repeats the critique or revision request;
a later round that fails so ends the rounds and keeps the last good revision.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..data import RowError, Text
from ..errors import LoraDpoError
from ..generation import SamplingSettings
from ..prompts import Prompt
from ..records import in_chunks, open_shared
from .common import (CHUNK_BATCHES, Outcome, add_input_arguments, add_model_arguments, add_sampling_arguments,
                     check_text, finish_output, launch, load_chat_model, open_output, pair_row,
                     prompts_fingerprint, read_collect_prompts, sampling_record, sampling_settings, show_bar,
                     stage_seed, unusable)
from .principles import Principles, load_principles

log = logging.getLogger("lora_dpo.collect")

# Where a model that has no end-of-turn habit starts the next turn itself.
TURN_STOPS = ("\nHuman:", "\nUser:", "\nCritique request:", "\nRevision request:")
PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course|absolutely|yes)\b[,.!]?\s*)?"
    r"(?:here(?:'s| is| are)\b[^\n:]{0,80}?:"
    r"|(?:the |a |my )?(?:revised|rewritten|improved|new|updated)\s+(?:response|answer|version|reply)\s*:"
    r"|(?:revision|critique|response|answer)\s*:)\s*",
    re.IGNORECASE)
QUOTES = ('"', "'", "\u201c\u201d", "\u2018\u2019")

SKIP_EMPTY_ANSWER = "empty first answer"
SKIP_EMPTY_CRITIQUE = "empty critique"
SKIP_EMPTY_REVISION = "empty revision"
SKIP_SAME = "revision identical to the first answer"
SKIP_ECHO = "reply repeats the request"


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def clean_reply(text: str, requests: Sequence[str] = ()) -> tuple[str, Optional[str]]:
    """The reply without preambles, labels and wrapping quotes; and why it is unusable (None when
    it is usable): empty, or repeating one of ``requests``."""
    text = text.strip()
    while True:
        stripped = PREAMBLE.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    for pair in QUOTES:
        opening, closing = (pair, pair) if len(pair) == 1 else (pair[0], pair[1])
        if len(text) >= 2 and text.startswith(opening) and text.endswith(closing) and opening not in text[1:-1]:
            text = text[1:-1].strip()
    if not text:
        return "", "empty"
    if any(_normal(request) in _normal(text) for request in requests):
        return text, SKIP_ECHO
    return text, None


@dataclass
class Round:
    principle: str
    critique: str
    revision: str


@dataclass
class Revised:
    prompt: Prompt
    answer: str = ""
    rounds: list[Round] = field(default_factory=list)
    skip: Optional[str] = None
    stopped: Optional[str] = None
    """Why a later round ended the rounds early (its revision was unusable), for the audit."""

    @property
    def revision(self) -> str:
        return self.rounds[-1].revision


def few_shot_turns(principles: Principles, count: Optional[int]) -> list[dict[str, str]]:
    turns = []
    for example in principles.examples[:count]:
        turns += [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer},
                  {"role": "user", "content": example.principle.critique},
                  {"role": "assistant", "content": example.critique},
                  {"role": "user", "content": example.principle.revision},
                  {"role": "assistant", "content": example.revision}]
    return turns


def as_messages(prompt: Text) -> list[dict[str, Any]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def with_examples(examples: list[dict[str, str]], prompt: Text) -> list[dict[str, Any]]:
    """The worked examples before the prompt's own turns; a system message the prompt opens with
    stays first, where chat templates want it."""
    messages = as_messages(prompt)
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system + examples + messages[len(system):]


def revise_prompts(model: Any, prompts: Sequence[Prompt], principles: Principles, settings: SamplingSettings,
                   rounds: int = 1, few_shot: Optional[int] = None) -> list[Revised]:
    """Answer, critique and revise each prompt; ``model`` has ``reply`` (common.ChatModel, or a
    scripted stand-in). One reply call per stage for all prompts: the model batches them."""
    examples = few_shot_turns(principles, few_shot)
    stops = tuple(dict.fromkeys(settings.stop + TURN_STOPS))
    answers = model.reply([p.text for p in prompts], [p.index for p in prompts], settings)
    results = []
    for prompt, samples in zip(prompts, answers):
        answer = samples[0].text.strip()
        results.append(Revised(prompt, answer, skip=None if answer else SKIP_EMPTY_ANSWER))
    start = {r.prompt.index: principles.draw(settings.seed, r.prompt.index) for r in results}
    for number in range(rounds):
        active = [r for r in results if r.skip is None and r.stopped is None]
        if not active:
            break
        chosen = {r.prompt.index: principles.principles[(start[r.prompt.index] + number) % len(principles.principles)]
                  for r in active}
        last = {r.prompt.index: r.revision if r.rounds else r.answer for r in active}
        asking = {r.prompt.index: with_examples(examples, r.prompt.text)
                  + [{"role": "assistant", "content": last[r.prompt.index]},
                     {"role": "user", "content": chosen[r.prompt.index].critique}] for r in active}
        stage = dataclasses.replace(settings, stop=stops, num_samples=1, seed=stage_seed(settings.seed, f"critique/{number}"))
        critiques = model.reply([asking[r.prompt.index] for r in active], [r.prompt.index for r in active], stage)
        revising = []
        for result, samples in zip(active, critiques):
            principle = chosen[result.prompt.index]
            critique, problem = clean_reply(samples[0].text, [principle.critique, principle.revision])
            if problem:
                _fail(result, SKIP_EMPTY_CRITIQUE if problem == "empty" else problem)
                continue
            asking[result.prompt.index] = asking[result.prompt.index] + [
                {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]
            revising.append((result, principle, critique))
        if not revising:
            continue
        stage = dataclasses.replace(stage, seed=stage_seed(settings.seed, f"revision/{number}"))
        revisions = model.reply([asking[r.prompt.index] for r, _, _ in revising],
                                [r.prompt.index for r, _, _ in revising], stage)
        for (result, principle, critique), samples in zip(revising, revisions):
            revision, problem = clean_reply(samples[0].text, [principle.critique, principle.revision])
            if problem is None and _normal(revision) == _normal(result.answer):
                problem = SKIP_SAME
            if problem:
                _fail(result, SKIP_EMPTY_REVISION if problem == "empty" else problem)
                continue
            result.rounds.append(Round(principle.name, critique, revision))
    return results


def _fail(result: Revised, reason: str) -> None:
    """A first round that fails skips the prompt; a later one ends its rounds."""
    if result.rounds:
        result.stopped = reason
    else:
        result.skip = reason


# ---------------------------------------------------------------------------------------------
# The command


def add_revise_parser(collect: Any, formatter: Any) -> None:
    parser = collect.add_parser("revise", formatter_class=formatter,
                                help="pairs from the model's own critique and revision under principles (docs/collect.md)")
    add_input_arguments(parser)
    add_model_arguments(parser, "--model", "the model that answers, critiques and revises")
    parser.add_argument("--principles", help="principles file (YAML; default: the shipped lora_dpo/collect/principles.yaml)")
    parser.add_argument("--rounds", type=int, default=1, help="critique-and-revise rounds, each under the next principle")
    parser.add_argument("--few-shot", type=int, help="worked examples shown before each request (default: all in the file)")
    parser.add_argument("--sft-out", help="also write (prompt, final revision) rows here, for fine-tuning before DPO")
    add_sampling_arguments(parser, num_samples=None)


def run_revise(args: Any) -> int:
    settings = sampling_settings(args, 1)
    if args.rounds < 1:
        raise LoraDpoError(f"--rounds {args.rounds}: must be at least 1")
    if args.few_shot is not None and args.few_shot < 0:
        raise LoraDpoError(f"--few-shot {args.few_shot}: must be >= 0")
    principles = load_principles(args.principles)
    prompts = read_collect_prompts(args)
    fingerprint = {"command": "collect revise", "model": args.model, "adapter": args.adapter,
                   "load_in_4bit": args.load_in_4bit, "dtype": args.dtype, **sampling_record(settings),
                   "principles": principles.fingerprint(), "rounds": args.rounds, "few_shot": args.few_shot,
                   **prompts_fingerprint(prompts)}
    processes = launch(args)
    out = open_output(args.out, fingerprint, args.overwrite, processes)
    sft = None
    try:
        if args.sft_out:
            sft = open_shared(args.sft_out, {**fingerprint, "sft": True}, args.overwrite, processes)
        todo = [p for p in prompts if not out.is_done(p.index) or (sft is not None and not sft.is_done(p.index))]
        if todo:
            model = load_chat_model(args.model, args.adapter, args, args.load_in_4bit, processes.device)
            audit = {"sampling": sampling_record(settings), "model": args.model, "adapter": args.adapter,
                     "principles": principles.source, "seed": settings.seed}

            def revise(share: Sequence[Prompt]) -> list[tuple[Outcome, Outcome]]:
                return [revised_outcomes(result, audit)
                        for result in revise_prompts(model, share, principles, settings, args.rounds, args.few_shot)]

            def write(prompt: Prompt, outcomes: tuple[Outcome, Outcome]) -> None:
                write_revised(out, sft, prompt.index, outcomes)

            in_chunks(todo, max(1, args.batch_size) * CHUNK_BATCHES * processes.count, "collect revise", "revised",
                      show_bar(args), revise, write, processes, logger=log)
            model.close()
    except BaseException:
        out.close()
        raise
    finally:
        if sft is not None:
            sft.close()
    if sft is not None and processes.is_main:
        print(sft.summary())
    finish_output(out, prompts)
    return 0


def revised_outcomes(result: Revised, audit: dict[str, Any]) -> tuple[Outcome, Outcome]:
    """The pair for OUT and the (prompt, revision) row for the SFT file, or why both are skipped."""
    skip, rows, sft_rows = result.skip, [], []
    if skip is None:
        prompt = result.prompt.text
        try:
            rows = [pair_row(prompt, result.revision, result.answer, principle=result.rounds[0].principle,
                             rounds=[dataclasses.asdict(r) for r in result.rounds], stopped=result.stopped, **audit)]
            completion = check_text(result.revision, "completion")
        except (RowError, LoraDpoError) as exc:
            skip = unusable(exc) if isinstance(exc, RowError) else str(exc)
        else:
            answer: Any = [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
            sft_rows = [{"prompt": prompt, "completion": answer, "principle": result.rounds[0].principle}]
    if skip is not None:
        return Outcome(skip=skip), Outcome(skip=skip)
    return Outcome(rows), Outcome(sft_rows)


def write_revised(out: Any, sft: Any, index: int, outcomes: tuple[Outcome, Outcome]) -> None:
    """The pair to OUT and the (prompt, revision) row to the SFT file, each where not done yet
    (a kill between the two writes leaves one behind, which the rerun completes)."""
    for records, outcome in zip((out, sft), outcomes):
        if records is not None and not records.is_done(index):
            outcome.record(records, index)
