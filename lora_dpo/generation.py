"""Sampling answers from a loaded causal LM: batched, length-sorted, left-padded, and seeded per
answer, so that an answer never depends on which other prompts shared its batch.

This module never loads a model, reads a file or prints (apart from an optional progress bar):
callers bring a loaded model and tokenizer and prompt token ids (``data.encode_prompt``, which
renders prompts exactly as training does)::

    from lora_dpo.data import encode_prompt
    from lora_dpo.generation import SamplingSettings, sample

    ids = [encode_prompt(tokenizer, prompt.text) for prompt in prompts]
    settings = SamplingSettings(max_new_tokens=256, temperature=0.8, num_samples=4, stop=("\\nUser:",))
    answers = sample(model, tokenizer, ids, settings, prompt_indices=[p.index for p in prompts],
                     batch_size=16, progress=True)
    answers[i][j].text, answers[i][j].token_ids, answers[i][j].finish_reason  # answer j to prompt i

Reference answers (the base, for a model with a LoRA adapter) come from the same model with the
adapter switched off: ``with model.disable_adapter(): sample(...)``. With the same settings and
prompt indices, the base's and the adapter's answers use the same random numbers, so their
difference is the adapter's. ``sample`` puts the model in eval mode for the call (no dropout, KV
cache on even when training turned it off) and restores training mode afterwards, so the training
loop can call it for periodic samples.

Determinism. Answer j to the prompt with index i is drawn from its own ``torch.Generator`` seeded
from (settings.seed, i, j) (``answer_seed``); the global RNG is never read or reseeded. transformers'
own sampling draws from the global RNG, so ``sample`` decodes greedily and makes greedy decoding an
exact sample by the Gumbel-max trick: transformers' own Temperature/TopK/TopP logits processors
filter the logits, then ``GumbelNoise`` adds independent Gumbel(0, 1) noise per token drawn from
each row's generator, and argmax(filtered logits + noise) is distributed exactly as
softmax(filtered logits). Each row draws one noise vector per step from its own generator, so
its random numbers depend only on (seed, i, j, step), whatever the batch size, order or
neighbours. What still can differ between batchings is floating point: a padded batch computes
the logits in a different order than a single row (rounding-level differences, larger in
bfloat16 than in float32), which flips a choice only where two candidates' noisy scores are that
close; on CPU in float32 the tests see identical tokens for every batching. Noise from a CUDA generator differs
from a CPU one: the same seed gives the same answers on the same device type.
``temperature=0`` is plain greedy decoding (no noise, ``seed`` unused).

Stopping. A row stops at the tokenizer's EOS, at every EOS the model's generation config names
(chat models often end a turn with a token other than the tokenizer's EOS), at a stop string
(transformers' ``StopStringCriteria``, counted only when the string lies inside the answer), or
after ``max_new_tokens``. ``Sample.token_ids`` run up to and including the token that stopped it;
``Sample.text`` is the answer as a reader sees it: special tokens skipped, and cut before the stop
string (which, with its token, is in ``token_ids``).

Batching and cost. ``batch_size`` counts sequences (prompt x sample rows). Prompts are sorted
longest first (a batch that does not fit in memory fails in the first seconds, not at the end),
and the n samples of one prompt are rows of one batch where they fit (``batch_size >= n``).
Memory grows with batch_size x (longest prompt + max_new_tokens) for the KV cache; a batch runs
until its slowest row stops, so very unequal answer lengths waste some of a batch. The per-row
noise costs one random vector of vocabulary size per row and step (one kernel launch per row;
not benchmarked against the forward pass).
For long jobs, call ``sample`` per chunk of prompts (a few batches each) and write each chunk:
that loses little to sorting and nothing to a crash.

Needs torch and transformers; both are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from .errors import LoraDpoError

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingSettings:
    """How answers are sampled. Field names match the CLI flags (``--max-new-tokens`` ...), which
    the errors of ``check`` name."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    """0 decodes greedily."""
    top_p: float = 0.9
    top_k: int = 50
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty; 1 disables it."""
    seed: int = 0
    num_samples: int = 1
    """Answers per prompt, each with its own random stream."""
    stop: tuple[str, ...] = ()
    """Stop strings: an answer ends where one of them appears (besides EOS)."""

    def check(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "--max-new-tokens", "must be at least 1"),
            (self.temperature >= 0, "--temperature", "must be >= 0 (0 decodes greedily)"),
            (0 < self.top_p <= 1, "--top-p", "must be in (0, 1]"),
            (self.top_k >= 0, "--top-k", "must be >= 0 (0 disables it)"),
            (self.repetition_penalty > 0, "--repetition-penalty", "must be positive (1 disables it)"),
            (self.num_samples >= 1, "--num-samples", "must be at least 1"),
            (self.num_samples == 1 or self.temperature > 0, "--num-samples",
             "needs --temperature above 0 (greedy decoding gives the same answer every time)"),
        ]
        for ok, flag, message in checks:
            if not ok:
                raise LoraDpoError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))}: {message}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise LoraDpoError(f"--stop {stop!r}: a stop string must be non-empty text")


@dataclass(frozen=True)
class Sample:
    """One answer."""

    token_ids: list[int]
    """The answer's tokens, up to and including the one that stopped it (EOS, or the token that
    completed a stop string)."""
    text: str
    """Decoded without special tokens, cut before the stop string when one stopped it."""
    finish_reason: str
    """``eos``, ``stop`` (a stop string) or ``length`` (max_new_tokens reached)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def answer_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of answer ``sample_index`` to prompt ``prompt_index``: a hash, so nearby seeds and
    indices give unrelated streams (``seed + index`` would make seed 1's prompt 0 seed 0's prompt 1)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's EOS and every EOS the model's generation config names."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    named = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos += named if isinstance(named, list) else [named] if named is not None else []
    if not eos:
        raise LoraDpoError("the tokenizer and the model's generation config name no EOS token, so answers "
                           "cannot end. Fix: use a tokenizer that defines eos_token")
    return sorted(set(eos))


def sample(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings, *,
           prompt_indices: Optional[Sequence[int]] = None, batch_size: int = 8, progress: Any = False,
           ) -> list[list[Sample]]:
    """``settings.num_samples`` answers to each prompt: ``result[k][j]`` is answer j to
    ``prompt_ids[k]``, in the order given.

    ``prompt_indices[k]`` names prompt k in the random streams (default: k). Pass the prompt's
    index in its file, so that a resumed or chunked job draws the same answers as one full run.
    ``batch_size`` counts sequences (prompts x samples). ``progress``: False, True (a tqdm bar on
    stderr counting prompts, with prompts/s and the time left), or a tqdm bar to advance by one
    per finished prompt (to share one bar across several calls).
    """
    import torch

    settings.check()
    if batch_size < 1:
        raise LoraDpoError(f"--batch-size {batch_size}: must be at least 1")
    indices = list(range(len(prompt_ids))) if prompt_indices is None else list(prompt_indices)
    if len(indices) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(indices)} prompt indices")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("a prompt has no tokens")
    n = settings.num_samples
    results: list[list[Optional[Sample]]] = [[None] * n for _ in prompt_ids]
    left = [n] * len(prompt_ids)
    eos = stop_token_ids(tokenizer, model)
    device = _input_device(model)
    with _progress(progress, len(prompt_ids)) as bar, _generation_mode(model, device), torch.no_grad():
        for rows in _plan_batches([len(ids) for ids in prompt_ids], n, batch_size):
            seeds = [answer_seed(settings.seed, indices[k], j) for k, j in rows]
            batch = [prompt_ids[k] for k, _ in rows]
            try:
                answers = _generate_batch(model, tokenizer, batch, seeds, settings, eos, device)
            except torch.OutOfMemoryError:
                longest = max(len(ids) for ids in batch) + settings.max_new_tokens
                raise LoraDpoError(f"out of memory generating {len(batch)} sequences of up to {longest} tokens at "
                                   "once. Fix: lower --batch-size (or --max-new-tokens)") from None
            for (k, j), answer in zip(rows, answers):
                results[k][j] = answer
                left[k] -= 1
                if left[k] == 0 and bar is not None:
                    bar.update(1)
    return results  # type: ignore[return-value]  # every slot is filled by the plan


def _plan_batches(lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Rows (prompt position, sample index) per batch: longest prompts first, a prompt's samples
    together in one batch when n <= batch_size, else spread over consecutive batches."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    if n > batch_size:
        rows = [(k, j) for k in order for j in range(n)]
        return [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    per_batch = batch_size // n
    return [[(k, j) for k in order[start:start + per_batch] for j in range(n)]
            for start in range(0, len(order), per_batch)]


def _generate_batch(model: Any, tokenizer: Any, prompts: list[Sequence[int]], seeds: list[int],
                    settings: SamplingSettings, eos: list[int], device: Any) -> list[Sample]:
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every row's next token is at the same column
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    processors = sampling_processors(settings, seeds, device)
    recorder = FinishRecorder(tokenizer, eos, settings.stop, width, len(prompts), device)
    # do_sample=False: argmax of the processed logits, which the Gumbel noise makes a sample. The
    # model's own generation config still fills what is not set here (e.g. suppress_tokens), as
    # it would for any transformers user; its sampling settings (temperature...) are ignored.
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              num_return_sequences=1, repetition_penalty=settings.repetition_penalty,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            logits_processor=processors, stopping_criteria=StoppingCriteriaList([recorder]))
    new_tokens = output[:, width:].tolist()
    answers = []
    for row, tokens in enumerate(new_tokens):
        length, reason = recorder.finished.get(row, (len(tokens), "length"))
        tokens = tokens[:length]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":
            cuts = [text.find(stop) for stop in settings.stop if stop in text]
            text = text[:min(cuts)] if cuts else text
        answers.append(Sample(tokens, text, reason))
    return answers


def sampling_processors(settings: SamplingSettings, seeds: list[int], device: Any) -> Any:
    """The logits processors that turn greedy decoding into sampling with ``settings``, one row
    per seed: transformers' own Temperature, TopK and TopP filters, in the order its sampling
    applies them, then ``GumbelNoise``. Empty for temperature 0 (greedy)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if settings.temperature > 0:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        processors.append(GumbelNoise(seeds, device))
    return processors


class GumbelNoise:
    """A transformers logits processor that adds Gumbel(0, 1) noise to every row's logits, drawn
    from that row's own ``torch.Generator``. Greedy decoding of the result is an exact sample from
    softmax of the logits it receives (the Gumbel-max trick): argmax_v(l_v + g_v) = v with
    probability exp(l_v) / sum exp(l). Filtered tokens (-inf) stay -inf and are never chosen."""

    def __init__(self, seeds: list[int], device: Any):
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32)
                               for g in self.generators])
        # Clamped away from 0 and 1: log(0) would give an infinite draw, a bias of ~1e-7 at most.
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1 - 2**-24)))
        return scores.float() + gumbel


class FinishRecorder:
    """A transformers stopping criterion that stops rows at EOS and at stop strings, and records
    where and why each row stopped, so that answers are cut exactly (padding after a finished row
    can hold ids the answer might also hold)."""

    def __init__(self, tokenizer: Any, eos: list[int], stop: Sequence[str], prompt_width: int, rows: int,
                 device: Any):
        import torch
        from transformers import StopStringCriteria

        self.tokenizer = tokenizer
        self.eos = torch.tensor(eos, device=device)
        self.stop = list(stop)
        # transformers' matcher works on token strings and may match a stop string that begins in
        # the prompt; such a match is checked against the answer's text before it stops the row.
        self.stop_strings = StopStringCriteria(tokenizer, self.stop) if self.stop else None
        self.prompt_width = prompt_width
        self.finished: dict[int, tuple[int, str]] = {}
        """row -> (number of answer tokens, reason)."""
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        length = input_ids.shape[1] - self.prompt_width
        at_eos = torch.isin(input_ids[:, -1], self.eos)
        done = at_eos.clone()
        if self.stop_strings is not None:
            matched = self.stop_strings(input_ids, scores)
            for row in matched.nonzero().flatten().tolist():
                if row in self.finished or bool(at_eos[row]):
                    continue
                answer = self.tokenizer.decode(input_ids[row, self.prompt_width:].tolist(), skip_special_tokens=False)
                if any(stop in answer for stop in self.stop):
                    done[row] = True
        for row in done.nonzero().flatten().tolist():
            if row not in self.finished:
                self.finished[row] = (length, "eos" if bool(at_eos[row]) else "stop")
        return done


def _input_device(model: Any) -> Any:
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _generation_mode(model: Any, device: Any) -> Iterator[None]:
    """Eval mode for the call, restored afterwards. A 4-bit base on CPU first has bitsandbytes'
    weight repacking turned off (modeling.keep_cpu_4bit_trainable), so that sampling during
    training does not silently break the gradients of the next steps."""
    if device.type == "cpu" and getattr(model, "is_loaded_in_4bit", False):
        from .modeling import keep_cpu_4bit_trainable

        keep_cpu_4bit_trainable(model)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _progress(progress: Any, total: int) -> Iterator[Any]:
    if progress is False or progress is None:
        yield None
    elif progress is True:
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="generate", unit="prompt", dynamic_ncols=True) as bar:
            yield bar
    else:
        yield progress

