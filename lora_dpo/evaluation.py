"""Did alignment work? The reference (adapter off) against the policy (adapter on) of a finished run.

``evaluate_run(run_dir, settings)`` is ``lora-dpo eval RUN_DIR`` and, with ``eval.after_training``,
the last step of ``lora-dpo train``. In order, so that one GPU holds one model at a time:

1. the run's held-out pairs are read (before any model loads: a bad file costs seconds);
2. the base + adapter load as training ran them; both models score the pairs through
   ``batching.score_pairs`` (preference metrics, the base's own ranking accuracy);
3. both answer the first ``prompts`` distinct held-out prompts ``samples`` times through
   ``generation.sample``, with the same seeds (answer j to prompt i: seed (seed, i, j));
4. both score the policy's answers, again through ``score_pairs`` (answers as the "chosen" side of a
   pair whose "rejected" side is the reference's answer): KL to the reference, nats per answer;
5. the model is freed, and only then the judge (``rewards.load_reward``) loads and scores every
   answer: wins, ties, losses, the win rate with a 95% interval and a length-controlled win rate.

Resumable: steps 3-4 and step 5 run chunk by chunk of prompts (``records.in_chunks``), and each
chunk's rows go to a stage file in OUT as soon as it is done (``records``: appended, with a
progress file; a torn row is cut off): ``answers.jsonl`` (both answers and the policy answer's
log-prob under each model, per answer) and, with a judge, ``scores.jsonl``. Their fingerprint
(``answers_fingerprint``) is what decides the rows; a rerun with the same one continues, another
is refused in one line naming the setting (``overwrite`` starts again), as ``lora-dpo collect``
does. Chunks are cut at fixed prompts and a half-written one is worked again whole, and the
final numbers always come from the rows read back from the stage files, so a resumed run writes
the bytes an uninterrupted one writes. The stage files are removed once the outputs are written.

Under torchrun or accelerate launch (``lora-dpo eval`` only; the evaluation at the end of
training runs in the main process), every process loads the run on its own device and scores,
answers and judges its share of the pairs and of each chunk's prompts (every ``count``-th); the
results are gathered in order on every process, and the main process alone writes (the stage
files too) and prints. The answers are those of one process, as each is seeded by its prompt and
sample.

Outputs, both written atomically (a temporary file renamed into place) once everything is
computed, eval.json last:
``OUT/samples.jsonl`` (one row per prompt and sample, the two answers side by side) and
``OUT/eval.json`` (``FORMAT`` 1, described in docs/evaluate.md), OUT defaulting to RUN_DIR/eval.
The metric functions below are pure functions of tensors and lists, tested on hand-worked numbers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .batching import PairLogps, score_pairs
from .config import Config, EvalConfig
from .data import (DataReport, PreferenceExample, Text, TokenizedPair, encode_prompt, load_examples,
                   read_preference_examples, tokenize_examples)
from .distributed import Processes
from .errors import DataError, LoraDpoError
from .generation import SamplingSettings, answer_seed, sample
from .losses import preference_loss
from .records import (CHUNK_BATCHES, Followed, Records, content_hash, from_main, in_chunks, open_shared, progress_path,
                      write_text_atomic)

log = logging.getLogger(__name__)

FORMAT = 1
EVAL_DIR = "eval"
ANSWERS_FILE = "answers.jsonl"
"""Stage file: both models' answers and the policy answers' log-probs, per prompt (removed at the end)."""
SCORES_FILE = "scores.jsonl"
"""Stage file: the judge's scores of those answers, per prompt (removed at the end)."""
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
LC_RIDGE = 1e-3
"""L2 penalty on the length coefficient of the length-controlled fit: keeps it finite when wins
and length separate perfectly (a few prompts), and moves the answer by under 1e-3 otherwise."""
KL_WARN_NATS = 50.0
LENGTH_WARN_RATIO = 1.5

MetricRow = dict[str, Optional[float]]


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


def ranking_accuracy(logps: PairLogps) -> tuple[float, float]:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one, by summed
    log-prob and by mean log-prob per token (a tie counts as wrong)."""
    per_token_chosen = logps.chosen.double() / logps.chosen_tokens.clamp(min=1)
    per_token_rejected = logps.rejected.double() / logps.rejected_tokens.clamp(min=1)
    return (_mean((logps.chosen > logps.rejected).float()),
            _mean((per_token_chosen > per_token_rejected).float()))


def preference_metrics(dpo: Any, policy: PairLogps, reference: PairLogps) -> dict[str, MetricRow]:
    """The metrics of the held-out pairs, each for the reference and the policy (None: not defined).

    Accuracy and margin are training's (``losses.preference_loss`` with the run's ``dpo``
    settings); the reference's are those of the reference taken as the policy, as at step 0 (for
    DPO-style rewards, beta * log(policy / reference), that is 0 and 0: a tie counts as wrong).
    """
    rows: dict[str, MetricRow] = {}
    results = {side: preference_loss(dpo, model, reference)
               for side, model in (("reference", reference), ("policy", policy))}
    margins = {side: result.chosen_rewards.double() - result.rejected_rewards.double()
               for side, result in results.items()}
    rows["held-out accuracy"] = {side: _mean((margin > 0).float()) for side, margin in margins.items()}
    rows["margin"] = {side: _mean(margin) for side, margin in margins.items()}
    rows["logps/chosen"] = {"reference": _mean(reference.chosen), "policy": _mean(policy.chosen)}
    rows["logps/rejected"] = {"reference": _mean(reference.rejected), "policy": _mean(policy.rejected)}
    rows["change of logps/chosen"] = {"reference": None,
                                      "policy": _mean(policy.chosen.double() - reference.chosen.double())}
    rows["change of logps/rejected"] = {"reference": None,
                                        "policy": _mean(policy.rejected.double() - reference.rejected.double())}
    summed = {"reference": ranking_accuracy(reference), "policy": ranking_accuracy(policy)}
    rows["ranking accuracy (summed)"] = {side: values[0] for side, values in summed.items()}
    rows["ranking accuracy (per token)"] = {side: values[1] for side, values in summed.items()}
    return rows


def kl_per_answer(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """Mean over the policy's own answers of sum_t (log pi(y_t) - log ref(y_t)), in nats per
    answer: a Monte Carlo estimate of KL(pi || ref) when the answers are samples of pi."""
    return _mean(policy_logps.double() - reference_logps.double())


def verdicts(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> list[float]:
    """1 where the policy's answer scores higher, 0.5 for a tie, 0 where the reference's does."""
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, reference_scores)]


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``rate`` observed over ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_controlled_win_rate(verdict: Sequence[float], policy_lengths: Sequence[float],
                               reference_lengths: Sequence[float], ridge: float = LC_RIDGE) -> float:
    """AlpacaEval 2's length control, without its per-instruction term: fit
    P(policy wins) = sigmoid(a + b * tanh(d / sd(d))), d = policy length - reference length, by
    maximum likelihood (ties are targets of 0.5), and read it at zero length difference: sigmoid(a).
    Newton's method on the 2-parameter problem, in float64, with a step-halving line search."""
    y = torch.tensor(list(verdict), dtype=torch.float64)
    if y.numel() == 0:
        return float("nan")
    if bool((y == y[0]).all()):
        return float(y[0])  # the fit's intercept runs off to +-infinity; its limit is the constant
    d = torch.tensor(list(policy_lengths), dtype=torch.float64) - torch.tensor(list(reference_lengths), dtype=torch.float64)
    spread = float(d.std()) if d.numel() > 1 else 0.0
    x = torch.tanh(d / spread) if spread > 0 else torch.zeros_like(d)
    features = torch.stack([torch.ones_like(x), x], dim=1)
    penalty = torch.tensor([0.0, ridge], dtype=torch.float64)

    def objective(w: torch.Tensor) -> torch.Tensor:
        logits = features @ w
        # Binary cross-entropy with soft targets, written with softplus to stay finite at large |logits|.
        return (torch.nn.functional.softplus(logits) - y * logits).mean() + (penalty * w * w).sum() / 2

    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(features @ w)
        gradient = features.T @ (p - y) / len(y) + penalty * w
        hessian = (features.T * (p * (1 - p))) @ features / len(y) + torch.diag(penalty) + 1e-12 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        scale, before = 1.0, objective(w)
        while objective(w - scale * step) > before and scale > 1e-6:
            scale /= 2
        w = w - scale * step
        if float(step.abs().max()) * scale < 1e-10:
            break
    return float(torch.sigmoid(w[0]))


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float], prompt_indices: Sequence[int],
             policy_lengths: Sequence[float], reference_lengths: Sequence[float]) -> dict[str, Any]:
    """Wins, ties, losses of the policy's answers against the reference's (same prompt and seed),
    the win rate (ties count half), its 95% Wilson interval with n = the number of prompts (the
    answers to one prompt are not independent, so counting answers would overstate the
    precision), and the length-controlled win rate."""
    verdict = verdicts(policy_scores, reference_scores)
    rate = sum(verdict) / len(verdict) if verdict else float("nan")
    low, high = wilson_interval(rate, len(set(prompt_indices)))
    return {"wins": verdict.count(1.0), "ties": verdict.count(0.5), "losses": verdict.count(0.0),
            "win_rate": rate, "ci95": [low, high],
            "lc_win_rate": length_controlled_win_rate(verdict, policy_lengths, reference_lengths)}


def eval_warnings(metrics: dict[str, MetricRow], length_ratio: float, kl: float, cut: float,
                  wins: Optional[dict[str, Any]], settings: EvalConfig) -> list[str]:
    """Plain-words warnings for what the numbers say is going wrong (docs/evaluate.md)."""
    warnings = []
    change = metrics["change of logps/chosen"]["policy"]
    if change is not None and change < 0:
        warnings.append(f"the chosen answers' log-probability fell by {-change:.3g} nats on average from the "
                        "reference (likelihood displacement): the margin grows by pushing both answers down; "
                        "read the samples, and consider a lower learning rate, a larger beta or RPO's NLL term")
    if length_ratio > LENGTH_WARN_RATIO:
        warnings.append(f"the policy's answers are {length_ratio:.2f}x as long as the reference's: DPO can win "
                        "by length alone; compare the length-controlled win rate with the raw one")
    if kl > KL_WARN_NATS:
        warnings.append(f"the KL to the reference is {kl:.3g} nats per answer, far above a few tens: the policy "
                        "has drifted far from the base; a larger beta or a lower learning rate keeps it closer")
    if cut > 0.1:
        warnings.append(f"{cut:.0%} of the policy's answers stopped at max_new_tokens ({settings.max_new_tokens}): "
                        "their lengths and KL are of cut answers; raise eval.max_new_tokens (--max-new-tokens)")
    if settings.temperature != 1.0 or settings.top_p < 1.0 or settings.top_k > 0:
        warnings.append("the answers were sampled with temperature/top-p/top-k filtering, not from the models "
                        "themselves, so the KL is only an indicator (temperature 1, top_p 1, top_k 0 measure it)")
    if wins is not None:
        low, high = wins["ci95"]
        if low <= 0.5 <= high:
            warnings.append(f"the win rate's 95% interval [{low:.2f}, {high:.2f}] includes 0.5: on these prompts "
                            "the judge cannot tell the two models apart; more prompts narrow it")
        if wins["win_rate"] - wins["lc_win_rate"] > 0.1:
            warnings.append(f"the length-controlled win rate ({wins['lc_win_rate']:.2f}) is well below the raw one "
                            f"({wins['win_rate']:.2f}): part of the wins come from longer answers")
    return warnings


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class EvalResult:
    run_dir: str
    out: str
    data: str
    pairs: int
    prompts: int
    samples_per_prompt: int
    judge: Optional[str]
    metrics: dict[str, MetricRow]
    length_ratio: float
    kl: float
    win_rate: Optional[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "data": self.data, "pairs": self.pairs, "prompts": self.prompts,
                "samples_per_prompt": self.samples_per_prompt, "judge": self.judge, "metrics": self.metrics,
                "length_ratio": self.length_ratio, "kl": self.kl, "win_rate": self.win_rate,
                "warnings": self.warnings}

    def lines(self) -> list[str]:
        """The table as printed."""
        width = max(len(name) for name in self.metrics)
        out = [f"evaluation of {self.run_dir}: {self.pairs} held-out pairs from {self.data}, "
               f"{self.prompts} prompts x {self.samples_per_prompt} answers",
               f"{'':<{width}}  {'reference':>10}  {'policy':>10}"]
        for name, row in self.metrics.items():
            out.append(f"{name:<{width}}  {_shown(row['reference'])}  {_shown(row['policy'])}")
        out.append(f"answer length ratio (policy / reference): {self.length_ratio:.3f}")
        if self.win_rate is not None:
            w = self.win_rate
            out.append(f"win rate over the reference, judged by {self.judge}: {w['win_rate']:.3f} "
                       f"(95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}; {w['wins']} wins, {w['ties']} ties, "
                       f"{w['losses']} losses), length-controlled {w['lc_win_rate']:.3f}")
        else:
            out.append("no judge: no win rate (pass --judge, or set eval.judge)")
        out += [f"warning: {warning}" for warning in self.warnings]
        out.append(f"eval.json and samples.jsonl in {self.out}")
        return out


def _shown(value: Optional[float]) -> str:
    if value is None:
        return f"{'-':>10}"
    return f"{value:>10.3f}" if abs(value) < 1e5 else f"{value:>10.3g}"


# ---------------------------------------------------------------------------------------------
# Held-out data


def held_out_examples(training: Config, data: Optional[str]) -> tuple[list[PreferenceExample], str]:
    """``data`` (a preference file or dataset, its eval_split), else the run's held-out pairs: its
    data.eval_file, or the share of data.train_file it held out, split exactly as training split it."""
    config = training.data
    columns = (config.prompt_column, config.chosen_column, config.rejected_column)
    if data:
        return load_examples(data, config.eval_split, columns, config.on_bad_row, DataReport(data)), data
    if config.eval_file:
        return (load_examples(config.eval_file, config.eval_split, columns, config.on_bad_row,
                              DataReport(config.eval_file)), config.eval_file)
    if config.eval_fraction > 0:
        examples = read_preference_examples(config, training.train.seed).eval
        if examples:
            return examples, f"{config.train_file} (held-out share {config.eval_fraction:g})"
    raise LoraDpoError("the run held out no pairs (data.eval_fraction=0 and no data.eval_file). "
                       "Fix: pass --data FILE with preference pairs it did not train on")


def distinct_prompts(examples: Sequence[PreferenceExample], limit: int) -> list[PreferenceExample]:
    """The first ``limit`` examples with a prompt not seen before, in file order."""
    seen, picked = set(), []
    for example in examples:
        key = json.dumps(example.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            picked.append(example)
            if len(picked) == limit:
                break
    return picked


# ---------------------------------------------------------------------------------------------
# The run


def evaluate_run(run_dir: str | Path, settings: EvalConfig, *, data: Optional[str] = None,
                 out: str | Path | None = None, device: str = "auto", progress: Optional[bool] = None,
                 show: Optional[Callable[[str], None]] = None, processes: Optional[Processes] = None,
                 overwrite: bool = False) -> EvalResult:
    """Evaluate the finished run in ``run_dir`` (its output.dir) as ``settings`` say, write
    ``out`` (default RUN_DIR/eval)/samples.jsonl and eval.json, and return the result. ``show``
    receives the printed table line by line. ``progress``: None shows bars on a terminal.
    ``processes``: the launched processes (``distributed.processes``), each of which calls this
    and gets the result, on its own device (``device`` is then unused); None: this one alone.
    An evaluation killed midway continues from its stage files in ``out`` when called again with
    the same settings (other settings: a one-line error); ``overwrite`` starts it again."""
    from .modeling import REFERENCE_ADAPTER, inspect_adapter, load_inference_model
    from .modeling import resolve_compute_dtype
    from .rewards import is_function_spec, load_reward

    run_dir = Path(run_dir)
    source = inspect_adapter(run_dir)  # refuses an unfinished run or a stray directory in one line
    training = source.training
    if training is None:
        raise LoraDpoError(f"{run_dir}: no config.yaml, so the run's data and tokenization are unknown. "
                           "Fix: point at a training run's output.dir")
    out = Path(out) if out is not None else run_dir / EVAL_DIR
    if out.exists() and not out.is_dir():
        raise LoraDpoError(f"--out {out} is a file. Fix: give a directory")
    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed,
                                num_samples=settings.samples)
    sampling.check()
    try:
        examples, data_name = held_out_examples(training, data)
    except DataError as exc:
        raise LoraDpoError(f"evaluation data: {exc}") from None
    judge = None
    if settings.judge and is_function_spec(settings.judge):
        judge = load_reward(settings.judge, four_bit=settings.judge_4bit, flag="--judge")  # fails in seconds
    elif settings.judge and not Path(settings.judge).exists() and (
            settings.judge.startswith((".", "/", "~")) or settings.judge.count("/") > 1):
        # A local path that is not there (a hub id has one slash): say so now, not after generating.
        raise LoraDpoError(f"--judge {settings.judge}: no such directory. Fix: give a reward model directory or hub "
                           "id, or module:function")
    picked = distinct_prompts(examples, settings.prompts)
    fingerprint = answers_fingerprint(run_dir, training, picked, settings)

    target: str | torch.device = device if processes is None else processes.device
    processes = processes if processes is not None else Processes()
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve().parent == run_dir.resolve():
            _record_in_run(run_dir, out.name)  # now, so that a killed evaluation's stage files go with the run
    with contextlib.ExitStack() as stages:
        # Opened before any model loads: other settings against a killed evaluation fail in seconds.
        answers_out = stages.enter_context(_open_stage(out / ANSWERS_FILE, fingerprint, overwrite, processes))
        scores_out = stages.enter_context(_open_stage(
            out / SCORES_FILE, {**fingerprint, "stage": "judge", "judge": settings.judge,
                                "judge_4bit": settings.judge_4bit}, overwrite, processes)) if settings.judge else None

        loaded = load_inference_model(None, str(run_dir), device=target)
        model, tokenizer = loaded.model, loaded.tokenizer
        if training.model.init_adapter:
            # Training's reference was the frozen starting adapter, not the bare base.
            model.load_adapter(training.model.init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        pairs = tokenize_examples(examples, tokenizer, training.data.max_length, training.data.max_prompt_length,
                                  DataReport(data_name), training.data.on_bad_row)
        if not pairs:
            raise LoraDpoError(f"{data_name}: no usable held-out pairs after tokenization. Fix: pass --data FILE")
        scoring = dict(micro_batch_size=training.train.micro_batch_size, layout=training.data.layout,
                       chunk_size=training.dpo.logps_chunk_size, pack_length=training.data.pack_length,
                       compute_dtype=resolve_compute_dtype(training.model, loaded.device))
        pad = tokenizer.pad_token_id
        from tqdm.auto import tqdm

        hidden = None if progress is None else not progress  # None: shown on a terminal
        bars = dict(dynamic_ncols=True, leave=False, disable=hidden if processes.is_main else True)
        # Each process scores its share of the pairs (every count-th); the rows come back in pair order.
        mine = [pairs[i] for i in processes.shard(len(pairs))]
        with tqdm(total=2 * len(mine), desc="score held-out pairs", unit="pair", **bars) as bar:
            policy = _gathered(processes, score_pairs(model, mine, pad, progress=bar.update, **scoring), len(pairs))
            reference = _gathered(processes, score_pairs(model, mine, pad, reference=True, progress=bar.update,
                                                         **scoring), len(pairs))
        metrics = preference_metrics(training.dpo, policy, reference)

        # Chunks of prompts, each process answering its share of each (every count-th prompt), as collect runs.
        chunk = max(1, settings.batch_size // settings.samples) * CHUNK_BATCHES * processes.count
        prompt_ids = [encode_prompt(tokenizer, example.prompt, chat_template=example.is_chat) for example in picked]
        answer_prompts(model, tokenizer, prompt_ids, sampling, settings.batch_size, scoring, answers_out, chunk,
                       progress is not False, processes)
        answers = _finished_rows(answers_out, processes)

        # One GPU: the policy goes before the judge comes.
        device_type = loaded.device.type
        del model, loaded, policy, reference
        gc.collect()
        if device_type == "cuda":
            torch.cuda.empty_cache()

        judged = None
        if scores_out is not None:
            if judge is None and _pending(scores_out, len(picked), chunk):
                judge = load_reward(settings.judge, device=target, four_bit=settings.judge_4bit,
                                    batch_size=settings.batch_size, flag="--judge")
            try:
                if judge is not None:
                    judge_answers(judge, [example.prompt for example in picked], answers, settings.batch_size,
                                  scores_out, chunk, progress is not False, processes)
            finally:
                if judge is not None:
                    judge.close()
            judged = _finished_rows(scores_out, processes)

    result, sample_rows = _assemble(run_dir, out, data_name, len(pairs), picked, settings, metrics, answers, judged)
    if not processes.is_main:
        return result  # the main process writes and prints
    write_outputs(out, result, sample_rows)
    for name in (ANSWERS_FILE, SCORES_FILE):  # the stage files are done with once the outputs are in place
        for path in (out / name, progress_path(out / name)):
            path.unlink(missing_ok=True)
    for line in result.lines():
        (show or print)(line)
    return result


def answers_fingerprint(run_dir: Path, training: Config, picked: Sequence[PreferenceExample],
                        settings: EvalConfig) -> dict[str, Any]:
    """What decides the answers and their log-probs, recorded in the stage files: the adapter's
    files and the reference's, the base, the prompts (their texts) and the sampling settings,
    named as the eval settings (and flags) are. Not the batch size: it changes only rounding."""
    from .reference_cache import adapter_identity

    init = training.model.init_adapter
    return {"command": "eval", "adapter": content_hash(adapter_identity(str(run_dir))["files"]),
            "reference": content_hash(adapter_identity(init)["files"]) if init else None,
            "model": training.model.name_or_path, "prompts": len(picked),
            "prompts_hash": content_hash([example.prompt for example in picked]), "samples": settings.samples,
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "top_k": settings.top_k, "seed": settings.seed}


def answer_prompts(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], sampling: SamplingSettings,
                   batch_size: int, scoring: dict[str, Any], stage: "Records | Followed", chunk: int, bar: bool,
                   processes: Processes) -> None:
    """Both models' answers to every prompt ``stage`` lacks, with the log-probs of the policy's
    answer under each model (the KL's terms), written to ``stage`` one chunk of prompts at a time:
    a row per answer, ``{"sample", "reference", "policy", "reference_tokens", "policy_tokens",
    "policy_cut", "policy_logp", "reference_logp"}``."""
    from .modeling import reference_model

    pad = tokenizer.pad_token_id

    def work(share: Sequence[int]) -> list[list[dict[str, Any]]]:
        ids = [prompt_ids[i] for i in share]
        policy = sample(model, tokenizer, ids, sampling, prompt_indices=share, batch_size=batch_size)
        with reference_model(model):  # the same model, adapter off (or the starting adapter): same seeds
            reference = sample(model, tokenizer, ids, sampling, prompt_indices=share, batch_size=batch_size)
        n = sampling.num_samples
        answer_pairs = [TokenizedPair(prompt_ids[i], policy[k][j].token_ids, reference[k][j].token_ids)
                        for k, i in enumerate(share) for j in range(n)]
        on_policy = score_pairs(model, answer_pairs, pad, **scoring).chosen.tolist()
        on_reference = score_pairs(model, answer_pairs, pad, reference=True, **scoring).chosen.tolist()
        return [[{"sample": j, "reference": reference[k][j].text, "policy": policy[k][j].text,
                  "reference_tokens": reference[k][j].num_tokens, "policy_tokens": policy[k][j].num_tokens,
                  "policy_cut": policy[k][j].finish_reason == "length",
                  "policy_logp": on_policy[k * n + j], "reference_logp": on_reference[k * n + j]}
                 for j in range(n)] for k in range(len(share))]

    _in_whole_chunks(stage, len(prompt_ids), chunk, "eval: answer", "answered", bar, work, processes)


def judge_answers(judge: Any, prompts: Sequence[Text], answers: dict[int, list[dict[str, Any]]], batch_size: int,
                  stage: "Records | Followed", chunk: int, bar: bool, processes: Processes) -> None:
    """The judge's score of both answers of every answer row of the prompts ``stage`` lacks,
    written to ``stage`` a chunk of prompts at a time: ``{"sample", "reference_score", "policy_score"}``."""
    def work(share: Sequence[int]) -> list[list[dict[str, Any]]]:
        rows = [(i, row) for i in share for row in answers[i]]
        texts = [prompts[i] for i, _ in rows]
        reference = _judge(judge, texts, [row["reference"] for _, row in rows], batch_size)
        policy = _judge(judge, texts, [row["policy"] for _, row in rows], batch_size)
        scored: dict[int, list[dict[str, Any]]] = {i: [] for i in share}
        for (i, row), r, p in zip(rows, reference, policy):
            scored[i].append({"sample": row["sample"], "reference_score": r, "policy_score": p})
        return [scored[i] for i in share]

    _in_whole_chunks(stage, len(prompts), chunk, "eval: judge", "judged", bar, work, processes)


def _in_whole_chunks(stage: "Records | Followed", count: int, chunk: int, desc: str, done: str, bar: bool,
                     work: Callable[[Sequence[int]], list[Any]], processes: Processes) -> None:
    """``records.in_chunks`` over the prompts 0..count-1 that ``stage`` lacks, in whole chunks:
    a chunk a killed run left half written is worked again in full (its finished prompts are not
    written twice), so that every chunk goes through the models with the same neighbours, and
    in the same batches, as in an uninterrupted run: the same numbers to the last bit, which a
    chunk cut short would change in rounding."""
    todo = _pending(stage, count, chunk)

    def write(prompt: int, rows: list[dict[str, Any]]) -> None:
        if not stage.is_done(prompt):
            stage.write(prompt, rows)

    in_chunks(todo, chunk, desc, done, bar, work, write, processes, logger=log)


def _pending(stage: "Records | Followed", count: int, chunk: int) -> list[int]:
    """The prompts of every chunk (of ``chunk`` prompts, from prompt 0) that ``stage`` lacks a
    prompt of; as whole chunks, in_chunks cuts them at the same places."""
    blocks = [range(start, min(count, start + chunk)) for start in range(0, count, chunk)]
    return [i for block in blocks if not all(stage.is_done(i) for i in block) for i in block]


def _open_stage(path: Path, fingerprint: dict[str, Any], overwrite: bool, processes: Processes) -> "Records | Followed":
    stage = open_shared(path, fingerprint, overwrite, processes)
    if isinstance(stage, Records) and stage.resumed:
        log.info(stage.status())
    return stage


def _finished_rows(stage: "Records | Followed", processes: Processes) -> dict[int, list[dict[str, Any]]]:
    """Every prompt's rows of a finished stage, on every process: the main process closes the file
    and reads it back, the others get its rows (one all-gather). Both a resumed and an
    uninterrupted run take their numbers from these same bytes."""
    rows: Optional[dict[int, list[dict[str, Any]]]] = None
    if isinstance(stage, Records):
        stage.close()
        rows = {}
        with stage.path.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                rows.setdefault(row["prompt_index"], []).append(row)
    return from_main(processes, rows)


def _assemble(run_dir: Path, out: Path, data_name: str, pairs: int, picked: Sequence[PreferenceExample],
              settings: EvalConfig, metrics: dict[str, MetricRow], answers: dict[int, list[dict[str, Any]]],
              judged: Optional[dict[int, list[dict[str, Any]]]]) -> tuple[EvalResult, list[dict[str, Any]]]:
    """The result and the rows of samples.jsonl, from the stage files' rows (answers, scores)."""
    keys = [(i, row["sample"]) for i in range(len(picked)) for row in answers[i]]
    rows = [row for i in range(len(picked)) for row in answers[i]]
    kl = kl_per_answer(torch.tensor([row["policy_logp"] for row in rows], dtype=torch.float64),
                       torch.tensor([row["reference_logp"] for row in rows], dtype=torch.float64))
    policy_lengths = [row["policy_tokens"] for row in rows]
    reference_lengths = [row["reference_tokens"] for row in rows]
    cut = sum(row["policy_cut"] for row in rows) / len(rows)
    metrics["answer length (tokens)"] = {"reference": sum(reference_lengths) / len(rows),
                                         "policy": sum(policy_lengths) / len(rows)}
    metrics["KL to reference (nats/answer)"] = {"reference": None, "policy": kl}
    length_ratio = metrics["answer length (tokens)"]["policy"] / max(1e-9, metrics["answer length (tokens)"]["reference"])
    scores: tuple[Optional[list[float]], Optional[list[float]]] = (None, None)
    wins = None
    if judged is not None:
        scored = [row for i in range(len(picked)) for row in judged[i]]
        scores = ([row["reference_score"] for row in scored], [row["policy_score"] for row in scored])
        wins = win_rate(scores[1], scores[0], [i for i, _ in keys], policy_lengths, reference_lengths)
        metrics["judge score (mean)"] = {"reference": sum(scores[0]) / len(rows), "policy": sum(scores[1]) / len(rows)}

    result = EvalResult(str(run_dir), str(out), data_name, pairs, len(picked), settings.samples, settings.judge,
                        metrics, length_ratio, kl, wins)
    result.warnings = eval_warnings(metrics, length_ratio, kl, cut, wins, settings)
    sample_rows = []
    for k, ((i, j), row) in enumerate(zip(keys, rows)):
        sample_rows.append({"prompt_index": i, "prompt": picked[i].prompt, "sample": j,
                            "seed": answer_seed(settings.seed, i, j),
                            "reference": row["reference"], "policy": row["policy"],
                            "reference_score": None if scores[0] is None else scores[0][k],
                            "policy_score": None if scores[1] is None else scores[1][k],
                            "reference_tokens": row["reference_tokens"], "policy_tokens": row["policy_tokens"]})
    return result, sample_rows


def _gathered(processes: Processes, logps: PairLogps, size: int) -> PairLogps:
    """The rows every process scored for its share of ``size`` pairs, in pair order (alone:
    ``logps`` as it is)."""
    if processes.count == 1:
        return logps
    return PairLogps(*(processes.gather_rows(getattr(logps, name), size)
                       for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))


def _judge(judge: Any, prompts: Sequence[Text], answers: Sequence[str], batch_size: int) -> list[float]:
    scores: list[float] = []
    for start in range(0, len(answers), batch_size):
        chunk = slice(start, start + batch_size)
        scores += judge.score(list(prompts[chunk]), list(answers[chunk]))
    return scores


def write_outputs(out: Path, result: EvalResult, sample_rows: list[dict[str, Any]]) -> None:
    """samples.jsonl, then eval.json, each to a temporary file renamed into place."""
    write_text_atomic(out / "samples.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sample_rows))
    write_text_atomic(out / "eval.json", json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")


def _record_in_run(run_dir: Path, name: str) -> None:
    """List the eval directory among the files the run wrote, so --overwrite (and the demo's rerun)
    clears it with the rest of the run instead of leaving an earlier run's numbers behind."""
    from .train import RUN_MARKER, record_written

    if (run_dir / RUN_MARKER).is_file():
        record_written(run_dir, {name})


# ---------------------------------------------------------------------------------------------
# The command


def run_eval_command(args: Any) -> int:
    """``lora-dpo eval RUN_DIR``: settings from the run's eval section, overridden by the flags."""
    from .config import load_config
    from .modeling import TRAINING_CONFIG

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise LoraDpoError(f"{run_dir}: no such directory. Fix: point at a training run's output.dir")
    settings = load_config(run_dir / TRAINING_CONFIG).eval if (run_dir / TRAINING_CONFIG).is_file() else EvalConfig()
    flags = {"judge": args.judge, "prompts": args.prompts, "samples": args.samples,
             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed, "batch_size": args.batch_size}
    settings = replace(settings, **{key: value for key, value in flags.items() if value is not None})
    if args.judge_4bit:
        settings = replace(settings, judge_4bit=True)
    for key, value in (("--prompts", settings.prompts), ("--samples", settings.samples),
                       ("--batch-size", settings.batch_size)):
        if value < 1:
            raise LoraDpoError(f"{key} {value}: must be at least 1")
    from .distributed import processes
    from .modeling import resolve_device

    # Under torchrun or accelerate launch: one process per GPU, each evaluating its share.
    launched = processes(resolve_device(args.device, "--device"))
    evaluate_run(run_dir, settings, data=args.data, out=args.out, device=args.device,
                 progress=False if args.no_progress else None, show=print, processes=launched,
                 overwrite=args.overwrite)
    sys.stdout.flush()
    return 0
