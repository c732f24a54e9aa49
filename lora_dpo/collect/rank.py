"""``lora-dpo collect rank``: best-of-n pairs. The generator samples n answers per prompt, a
reward model or a ``module:function`` scores them, and the ranking gives chosen and rejected
(Llama 2's rejection sampling, RLHFlow's iterative DPO).

Two stages, so that one GPU holds one model at a time: every prompt's answers are sampled into
``OUT.candidates`` (resumable), the generator is freed, then the reward loads and each prompt's
pairs are written to OUT as it is scored. Forming pairs is a pure function of the answers and
their scores (``rank_pairs``), tested without a model:

- empty answers and repeats of an earlier answer are dropped before scoring (they cost reward
  calls and a repeat cannot pair with itself); a prompt left with fewer than two answers is
  skipped;
- the score that ranks is ``reward - length_penalty * tokens`` (the generator's tokens), which
  counters a reward model's taste for long answers;
- ``best-worst``: the highest against the lowest; ``best-random``: the highest against one of the
  answers below it, drawn with a generator seeded from (seed, prompt index); ``all-above-margin``:
  every pair whose gap is above ``margin``, best first. In every mode a pair's gap must exceed
  ``margin`` (default 0: strictly better); a prompt whose answers all score the same, or with no
  gap above the margin, is skipped, and each skip is counted by its reason.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..data import RowError
from ..errors import LoraDpoError
from ..records import in_chunks
from .common import (CHUNK_BATCHES, Candidates, Outcome, add_input_arguments, add_model_arguments,
                     add_sampling_arguments, collect_candidates, finish_output, launch, load_chat_model,
                     open_output, pair_row, prompts_fingerprint, read_collect_prompts, sampling_record,
                     sampling_settings, show_bar, unusable)

log = logging.getLogger("lora_dpo.collect")

PAIR_MODES = ("best-worst", "best-random", "all-above-margin")
SKIP_FEW = "fewer than two distinct non-empty answers"
SKIP_TIED = "all answers scored the same"
SKIP_MARGIN = "no score gap above --margin"


# ---------------------------------------------------------------------------------------------
# Forming pairs: pure functions


@dataclass
class Distinct:
    kept: list[int]
    """Indices of the answers to score: non-empty, each text's first occurrence."""
    empty: int = 0
    duplicates: int = 0


def distinct_answers(texts: Sequence[str]) -> Distinct:
    """Drop empty answers (whitespace only) and repeats; an answer that differs only in leading or
    trailing whitespace is a repeat."""
    result, seen = Distinct([]), set()
    for index, text in enumerate(texts):
        key = text.strip()
        if not key:
            result.empty += 1
        elif key in seen:
            result.duplicates += 1
        else:
            seen.add(key)
            result.kept.append(index)
    return result


def ranking_scores(scores: Sequence[float], lengths: Sequence[int], length_penalty: float) -> list[float]:
    return [score - length_penalty * length for score, length in zip(scores, lengths)]


@dataclass
class Ranked:
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """(chosen, rejected) positions in the scored list."""
    skip: Optional[str] = None


def rank_pairs(scores: Sequence[float], mode: str, margin: float = 0.0, rng: Optional[random.Random] = None) -> Ranked:
    """Pairs from the ranking scores of one prompt's distinct answers. Ties break towards the
    earlier answer, so the result is a function of the inputs (and ``rng`` for best-random)."""
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown pairing mode {mode}")
    if len(scores) < 2:
        return Ranked(skip=SKIP_FEW)
    if max(scores) == min(scores):
        return Ranked(skip=SKIP_TIED)
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    best = order[0]
    if mode == "best-worst":
        worst = min(range(len(scores)), key=lambda k: (scores[k], k))
        pairs = [(best, worst)] if scores[best] - scores[worst] > margin else []
    elif mode == "best-random":
        below = [k for k in order if scores[best] - scores[k] > margin]
        pairs = [(best, (rng or random.Random(0)).choice(below))] if below else []
    else:
        pairs = [(i, j) for i in order for j in reversed(order) if scores[i] - scores[j] > margin]
    return Ranked(pairs) if pairs else Ranked(skip=SKIP_MARGIN)


def pair_rng(seed: int, prompt_index: int) -> random.Random:
    """best-random's draw for one prompt: the same on every run and whatever else was collected."""
    return random.Random(f"{seed}/{prompt_index}/best-random")


# ---------------------------------------------------------------------------------------------
# The command


def add_rank_parser(collect: Any, formatter: Any) -> None:
    parser = collect.add_parser("rank", formatter_class=formatter,
                                help="pairs from n sampled answers ranked by a reward model or a function (docs/collect.md)")
    add_input_arguments(parser)
    add_model_arguments(parser, "--generator", "the model that answers")
    parser.add_argument("--reward-model", required=True, metavar="MODEL|module:function",
                        help="reward model (sequence classifier with one output) or a Python function "
                        "(prompt, answer) -> float, e.g. lora_dpo.demo:kindness or my_rewards.py:brevity")
    parser.add_argument("--reward-load-in-4bit", action="store_true", help="load the reward model in 4-bit NF4")
    parser.add_argument("--reward-batch-size", type=int, default=8, help="answers the reward model scores together")
    parser.add_argument("--pairs", default="best-worst", choices=PAIR_MODES, help="how pairs are formed from the ranking")
    parser.add_argument("--margin", type=float, default=0.0, help="a pair's score gap must exceed this")
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="ranking score = reward - this x answer tokens (counters a taste for long answers)")
    add_sampling_arguments(parser, num_samples=4)


def run_rank(args: Any) -> int:
    settings = sampling_settings(args, args.num_samples)
    if settings.num_samples < 2:
        raise LoraDpoError(f"--num-samples {settings.num_samples}: ranking needs at least 2 answers per prompt")
    if args.margin < 0 or args.length_penalty < 0:
        flag, value = ("--margin", args.margin) if args.margin < 0 else ("--length-penalty", args.length_penalty)
        raise LoraDpoError(f"{flag} {value}: must be >= 0")
    if args.reward_batch_size < 1:
        raise LoraDpoError(f"--reward-batch-size {args.reward_batch_size}: must be at least 1")
    prompts = read_collect_prompts(args)
    from ..rewards import is_function_spec, load_reward

    reward_is_function = is_function_spec(args.reward_model)
    if reward_is_function:  # a wrong name fails now, not after the generation
        load_reward(args.reward_model, flag="--reward-model")
    generated = {"generator": args.generator, "adapter": args.adapter, "load_in_4bit": args.load_in_4bit,
                 "dtype": args.dtype, **sampling_record(settings), **prompts_fingerprint(prompts)}
    fingerprint = {"command": "collect rank", **generated, "reward": args.reward_model,
                   "reward_load_in_4bit": args.reward_load_in_4bit, "pairs": args.pairs, "margin": args.margin,
                   "length_penalty": args.length_penalty}
    processes = launch(args)
    out = open_output(args.out, fingerprint, args.overwrite, processes)
    try:
        candidates, generator = collect_candidates(
            out, prompts, settings, generated, lambda: load_chat_model(args.generator, args.adapter, args,
                                                                       args.load_in_4bit, processes.device),
            overwrite=args.overwrite, bar_enabled=show_bar(args), desc="collect rank", processes=processes)
        if candidates:
            if generator is not None:
                # One model in memory at a time: both might fit, but the reward model's size is not known yet.
                generator.close(before=f"the reward {args.reward_model}")
            reward = load_reward(args.reward_model, device=processes.device, four_bit=args.reward_load_in_4bit,
                                 batch_size=args.reward_batch_size, flag="--reward-model")
            try:
                audit = {"sampling": sampling_record(settings), "generator": args.generator, "adapter": args.adapter,
                         "reward": args.reward_model, "seed": settings.seed}
                score_and_write(out, [p for p in prompts if p.index in candidates], candidates, reward, args, audit,
                                processes)
            finally:
                reward.close()
    except BaseException:
        out.close()
        raise
    finish_output(out, prompts)
    return 0


def score_and_write(out: Any, prompts: Sequence[Any], candidates: dict[int, Candidates], reward: Any, args: Any,
                    audit: dict[str, Any], processes: Any) -> None:
    """Score each prompt's distinct answers (many prompts per reward call: the reward model
    batches them), form the pairs, write or skip each prompt. Each process scores its share of
    a chunk; the main process writes them all."""
    dropped = Distinct([])

    def score(share: Sequence[Any]) -> list[tuple[Outcome, int, int]]:
        distinct = {p.index: distinct_answers(candidates[p.index].texts) for p in share}
        queries = [(p, k) for p in share for k in distinct[p.index].kept]
        values = reward.score([p.text for p, _ in queries], [candidates[p.index].texts[k] for p, k in queries])
        scores: dict[int, list[float]] = {p.index: [] for p in share}
        for (prompt, _), value in zip(queries, values):
            scores[prompt.index].append(value)
        return [(rank_outcome(p, candidates[p.index], distinct[p.index].kept, scores[p.index], args, audit),
                 distinct[p.index].empty, distinct[p.index].duplicates) for p in share]

    def write(prompt: Any, result: tuple[Outcome, int, int]) -> None:
        outcome, empty, duplicates = result
        dropped.empty += empty
        dropped.duplicates += duplicates
        outcome.record(out, prompt.index)

    size = max(1, args.reward_batch_size) * CHUNK_BATCHES * processes.count
    in_chunks(prompts, size, "collect rank: score", "scored", show_bar(args), score, write, processes, logger=log)
    if dropped.empty or dropped.duplicates:
        log.info("dropped before scoring: %d empty answers, %d repeated answers", dropped.empty, dropped.duplicates)


def rank_outcome(prompt: Any, found: Candidates, kept: list[int], scores: list[float], args: Any,
                 audit: dict[str, Any]) -> Outcome:
    """One prompt's pairs from its scored answers, or why it is skipped."""
    ranking = ranking_scores(scores, [found.tokens[k] for k in kept], args.length_penalty)
    ranked = rank_pairs(ranking, args.pairs, args.margin, pair_rng(audit["seed"], prompt.index))
    if ranked.skip:
        return Outcome(skip=ranked.skip)
    every = [None] * len(found.texts)  # dropped answers have no score
    for k, score in zip(kept, scores):
        every[k] = score
    rows = []
    try:
        for chosen, rejected in ranked.pairs:
            rows.append(pair_row(prompt.text, found.texts[kept[chosen]], found.texts[kept[rejected]],
                                 chosen_score=scores[chosen], rejected_score=scores[rejected],
                                 candidates=found.texts, scores=every, tokens=found.tokens, **audit))
    except RowError as exc:
        return Outcome(skip=unusable(exc))
    return Outcome(rows)
