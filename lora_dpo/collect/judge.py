"""``lora-dpo collect judge``: AI feedback (Constitutional AI's RL phase). Two sampled answers
per prompt; a model picks the better one under a principle phrased as a multiple-choice
question, and the preference is read from the probabilities of the option letters.

The question is one user turn (the conversation, the principle's choice question, the two
answers as options (A) and (B)); the judge's answer starts with "The answer is: (" and the
probabilities of "A" and "B" as its next text are compared (``ChatModel.option_logps``, no
generation). It is asked in both orders, which cancels a judge's taste for one position: with
p1 = P(first answer | first as A) and p2 = P(first answer | first as B), both above 1/2 prefer
the first answer, both below the second; the orderings disagreeing (a position-biased judge)
skips the prompt, and so does a preference (p1 + p2) / 2 weaker than ``--min-confidence``.
Each skip is counted by its reason.

The judge may be another model than the generator (``--judge``, e.g. a larger 4-bit one): the
answers are then sampled first into ``OUT.candidates``, the generator is freed, and the judge
loads. Without ``--judge`` one model does both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..data import RowError, Text
from ..errors import LoraDpoError
from ..prompts import Prompt
from ..records import in_chunks
from .common import (CHUNK_BATCHES, Candidates, Outcome, add_input_arguments, add_model_arguments,
                     add_sampling_arguments, collect_candidates, finish_output, launch, load_chat_model,
                     open_output, pair_row, prompts_fingerprint, read_collect_prompts, sampling_record,
                     sampling_settings, show_bar, unusable)
from .principles import Principles, load_principles

log = logging.getLogger("lora_dpo.collect")

LEAD = "The answer is: ("
OPTIONS = ("A", "B")
SKIP_FEW = "the two answers are empty or the same"
SKIP_DISAGREE = "the two orderings disagree"
SKIP_WEAK = "preference weaker than --min-confidence"


def transcript(prompt: Text) -> str:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def choice_question(prompt: Text, question: str, first: str, second: str) -> list[dict[str, str]]:
    """The judge's turn: the conversation, the question, the answers as (A) and (B)."""
    text = (f"Consider the following conversation between a human and an assistant:\n{transcript(prompt)}\n\n"
            f"{question}\nOptions:\n(A) {first}\n(B) {second}\n"
            "Answer with the letter of the better option.")
    return [{"role": "user", "content": text}]


@dataclass
class Judged:
    prompt: Prompt
    principle: str
    first_as_a: float = 0.5
    """P(the first answer is better), asked with it as option A."""
    first_as_b: float = 0.5
    """The same, asked with it as option B."""
    chosen: Optional[int] = None
    skip: Optional[str] = None

    @property
    def confidence(self) -> float:
        mean = (self.first_as_a + self.first_as_b) / 2
        return mean if self.chosen == 0 else 1 - mean


def preference(first_as_a: float, first_as_b: float, min_confidence: float) -> tuple[Optional[int], Optional[str]]:
    """(index of the preferred answer, None) or (None, skip reason)."""
    if first_as_a > 0.5 and first_as_b > 0.5:
        chosen = 0
    elif first_as_a < 0.5 and first_as_b < 0.5:
        chosen = 1
    else:
        return None, SKIP_DISAGREE
    mean = (first_as_a + first_as_b) / 2
    if (mean if chosen == 0 else 1 - mean) < min_confidence:
        return None, SKIP_WEAK
    return chosen, None


def judge_prompts(judge: Any, prompts: Sequence[Prompt], answers: dict[int, list[str]], principles: Principles,
                  seed: int, min_confidence: float) -> list[Judged]:
    """Each prompt's two answers asked in both orders under its principle; ``judge`` has
    ``option_logps`` (common.ChatModel, or a scripted stand-in). One call for all prompts."""
    results, questions = [], []
    for prompt in prompts:
        principle = principles.principles[principles.draw(seed, prompt.index)]
        result = Judged(prompt, principle.name)
        first, second = (text.strip() for text in answers[prompt.index][:2])
        if not first or not second or first == second:
            result.skip = SKIP_FEW
        else:
            questions.append((result, choice_question(prompt.text, principle.choice, first, second)))
            questions.append((result, choice_question(prompt.text, principle.choice, second, first)))
        results.append(result)
    if questions:
        logps = judge.option_logps([question for _, question in questions], LEAD, OPTIONS)
        for k in range(0, len(questions), 2):
            result = questions[k][0]
            (a1, b1), (a2, b2) = logps[k], logps[k + 1]
            result.first_as_a = _sigmoid(a1 - b1)
            result.first_as_b = _sigmoid(b2 - a2)
            result.chosen, result.skip = preference(result.first_as_a, result.first_as_b, min_confidence)
    return results


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---------------------------------------------------------------------------------------------
# The command


def add_judge_parser(collect: Any, formatter: Any) -> None:
    parser = collect.add_parser("judge", formatter_class=formatter,
                                help="pairs from two answers a model compares under principles, asked in both orders "
                                "(docs/collect.md)")
    add_input_arguments(parser)
    add_model_arguments(parser, "--model", "the model that answers (and judges, without --judge)")
    parser.add_argument("--judge", help="another model as the judge (default: --model itself)")
    parser.add_argument("--judge-adapter", help="LoRA adapter on the judge")
    parser.add_argument("--judge-load-in-4bit", action="store_true", help="load the judge in 4-bit NF4")
    parser.add_argument("--principles", help="principles file (YAML; default: the shipped lora_dpo/collect/principles.yaml)")
    parser.add_argument("--min-confidence", type=float, default=0.6,
                        help="skip pairs whose averaged probability of the preferred answer is below this")
    add_sampling_arguments(parser, num_samples=None)


def run_judge(args: Any) -> int:
    settings = sampling_settings(args, 2)
    if not 0.5 <= args.min_confidence < 1:
        raise LoraDpoError(f"--min-confidence {args.min_confidence}: must be in [0.5, 1)")
    principles = load_principles(args.principles)
    prompts = read_collect_prompts(args)
    separate = args.judge is not None and (args.judge, args.judge_adapter, args.judge_load_in_4bit) != (
        args.model, args.adapter, args.load_in_4bit)
    generated = {"generator": args.model, "adapter": args.adapter, "load_in_4bit": args.load_in_4bit,
                 "dtype": args.dtype, **sampling_record(settings), **prompts_fingerprint(prompts)}
    judge_name = args.judge if separate else args.model
    fingerprint = {"command": "collect judge", **generated, "judge": judge_name,
                   "judge_adapter": args.judge_adapter if separate else args.adapter,
                   "judge_load_in_4bit": args.judge_load_in_4bit if separate else args.load_in_4bit,
                   "principles": principles.fingerprint(), "min_confidence": args.min_confidence}
    processes = launch(args)
    out = open_output(args.out, fingerprint, args.overwrite, processes)
    device = processes.device
    try:
        candidates, model = collect_candidates(
            out, prompts, settings, generated,
            lambda: load_chat_model(args.model, args.adapter, args, args.load_in_4bit, device),
            overwrite=args.overwrite, bar_enabled=show_bar(args), desc="collect judge", processes=processes)
        if candidates:
            if separate:
                if model is not None:
                    model.close(before=f"the judge {args.judge}")  # one model in memory at a time
                model = load_chat_model(args.judge, args.judge_adapter, args, args.judge_load_in_4bit, device)
            elif model is None:  # every answer was sampled by an earlier run
                model = load_chat_model(args.model, args.adapter, args, args.load_in_4bit, device)
            audit = {"sampling": sampling_record(settings), "generator": args.model, "adapter": args.adapter,
                     "judge": judge_name, "principles": principles.source, "seed": settings.seed}
            todo = [p for p in prompts if p.index in candidates]

            def judge(share: Sequence[Prompt]) -> list[Outcome]:
                found = {p.index: candidates[p.index].texts for p in share}
                return [judged_outcome(result, candidates[result.prompt.index], audit)
                        for result in judge_prompts(model, share, found, principles, settings.seed, args.min_confidence)]

            def write(prompt: Prompt, outcome: Outcome) -> None:
                outcome.record(out, prompt.index)

            in_chunks(todo, max(1, args.batch_size) * CHUNK_BATCHES * processes.count, "collect judge: judge", "judged",
                      show_bar(args), judge, write, processes, logger=log)
            model.close()
    except BaseException:
        out.close()
        raise
    finish_output(out, prompts)
    return 0


def judged_outcome(result: Judged, found: Candidates, audit: dict[str, Any]) -> Outcome:
    """One prompt's pair, the preferred answer chosen, or why it is skipped."""
    if result.skip:
        return Outcome(skip=result.skip)
    chosen, rejected = found.texts[result.chosen], found.texts[1 - result.chosen]
    try:
        row = pair_row(result.prompt.text, chosen, rejected, principle=result.principle,
                       preference=result.confidence, first_as_a=result.first_as_a, first_as_b=result.first_as_b,
                       candidates=found.texts, **audit)
    except RowError as exc:
        return Outcome(skip=unusable(exc))
    return Outcome([row])
