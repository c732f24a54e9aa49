"""generation.sample: answers that do not depend on the batching, an exact sampler (Gumbel-max
against the softmax), greedy decoding as transformers does it, stopping at EOS / the generation
config's EOS / stop strings / the length limit, the adapter switched off, and a 4-bit base on CPU."""

from __future__ import annotations

import pytest
import torch

from lora_dpo.data import encode_prompt
from lora_dpo.generation import SamplingSettings, answer_seed, sample, sampling_processors

PROMPTS = ["Can you tell me about bread?", "Hi", "Give me a tip about chess, and one about the moon too.",
           [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why do people like owls?"}],
           "Tea?"]
SAMPLED = SamplingSettings(max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, num_samples=3, seed=5)


@pytest.fixture(scope="module")
def model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [encode_prompt(tokenizer, prompt) for prompt in PROMPTS]


def tokens(result):
    return [[answer.token_ids for answer in answers] for answers in result]


def test_same_answers_whatever_the_batch(model, tokenizer, prompt_ids):
    reference = tokens(sample(model, tokenizer, prompt_ids, SAMPLED, batch_size=1))
    for batch_size in (4, 7, 15):
        assert tokens(sample(model, tokenizer, prompt_ids, SAMPLED, batch_size=batch_size)) == reference, batch_size
    # Other neighbours, another order: the answers of a prompt follow it through its index.
    picked = [3, 0]
    companions = [encode_prompt(tokenizer, "Something else entirely, to share the batch with.")] + [prompt_ids[k] for k in picked]
    result = tokens(sample(model, tokenizer, companions, SAMPLED, prompt_indices=[99] + picked, batch_size=5))
    assert result[1:] == [reference[k] for k in picked]
    # Each sample of a prompt has its own stream; another seed gives other answers.
    assert all(len({tuple(ids) for ids in answers}) == 3 for answers in reference)
    other = SamplingSettings(**{**SAMPLED.__dict__, "seed": 6})
    assert tokens(sample(model, tokenizer, prompt_ids, other, batch_size=4)) != reference
    assert answer_seed(5, 1, 0) != answer_seed(6, 0, 0) and answer_seed(5, 1, 0) == answer_seed(5, 1, 0)


@pytest.mark.parametrize("settings", [SamplingSettings(temperature=1.0, top_p=1.0, top_k=0),
                                      SamplingSettings(temperature=0.7, top_p=0.9, top_k=5)],
                         ids=["plain", "temperature-topk-topp"])
def test_gumbel_max_draws_follow_the_softmax(settings):
    """Token frequencies over 40 000 draws from a fixed logits vector match softmax of the logits
    as transformers' own warpers filter them; filtered tokens are never drawn."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    expected = logits.clone()
    for warper in (TemperatureLogitsWarper(settings.temperature), TopKLogitsWarper(settings.top_k or 8),
                   TopPLogitsWarper(settings.top_p)):
        expected = warper(None, expected)
    expected = expected.softmax(-1)[0]
    rows, steps = 400, 100
    processors = sampling_processors(settings, [answer_seed(0, row, 0) for row in range(rows)], torch.device("cpu"))
    counts = torch.zeros(8)
    for _ in range(steps):
        counts += torch.bincount(processors(None, logits.expand(rows, -1).clone()).argmax(-1), minlength=8)
    frequencies = counts / counts.sum()
    # 40 000 draws: a frequency's standard error is at most 0.0025, so 0.01 is four of them.
    assert torch.allclose(frequencies, expected.float(), atol=0.01), (frequencies, expected)
    assert torch.all(frequencies[expected == 0] == 0)
    if settings.top_k:
        assert (expected == 0).sum() >= 3  # the filters did remove tokens in this case


def test_greedy_is_transformers_greedy_and_ignores_the_seed(model, tokenizer, prompt_ids):
    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    first = sample(model, tokenizer, prompt_ids, greedy, batch_size=3)
    again = sample(model, tokenizer, prompt_ids, SamplingSettings(max_new_tokens=8, temperature=0, seed=9), batch_size=5)
    assert tokens(first) == tokens(again)
    ids = torch.tensor([prompt_ids[0]])
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert first[0][0].token_ids == plain[0, ids.shape[1]:].tolist()[:first[0][0].num_tokens]

    # Sampling settings in the model's own generation config (instruct models ship some) are not used.
    reference = tokens(sample(model, tokenizer, prompt_ids[:2], SAMPLED, batch_size=6))
    saved = model.generation_config
    model.generation_config = type(saved)(**{**saved.to_dict(), "do_sample": True, "temperature": 0.1, "top_k": 1,
                                             "top_p": 0.5})
    try:
        assert tokens(sample(model, tokenizer, prompt_ids[:2], SAMPLED, batch_size=6)) == reference
    finally:
        model.generation_config = saved


def test_answers_stop_at_eos_stop_strings_and_the_length_limit(model, tokenizer, prompt_ids):
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=1)
    free = sample(model, tokenizer, prompt_ids[:1], settings)[0][0]
    assert free.finish_reason == "length" and free.num_tokens == 12
    assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=True)

    # An EOS named only by the model's generation config ends the answer, and is its last token.
    extra_eos = free.token_ids[4]
    first_at = free.token_ids.index(extra_eos)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    try:
        stopped = sample(model, tokenizer, prompt_ids[:1], settings)[0][0]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert stopped.finish_reason == "eos" and stopped.token_ids == free.token_ids[:first_at + 1]

    # A stop string ends it too: tokens up to the one completing it, text cut before it.
    # (a word the answer holds: a random model's text is full of partial UTF-8 bytes)
    words = [tokenizer.decode([token]).strip() for token in free.token_ids[2:]]
    stop = next(word for word in words if word.isascii() and word.isalpha() and len(word) >= 2)
    assert free.text.index(stop) > 0
    with_stop = SamplingSettings(**{**settings.__dict__, "stop": ("never appears", stop)})
    cut = sample(model, tokenizer, prompt_ids[:1], with_stop)[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert free.token_ids[:cut.num_tokens] == cut.token_ids and cut.num_tokens < free.num_tokens
    assert stop in tokenizer.decode(cut.token_ids) and stop not in tokenizer.decode(cut.token_ids[:-1])

    # A stop string that only spans the prompt's end and the answer's start does not stop it.
    spanning = SamplingSettings(**{**settings.__dict__, "stop": ("assistant\n" + free.text[:1],)})
    assert "assistant\n" not in free.text
    assert sample(model, tokenizer, prompt_ids[:1], spanning)[0][0] == free


def test_adapter_switched_off_gives_the_base_answers(model, llama_dir, tokenizer, prompt_ids):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
                                LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()  # as in the training loop: sampling must not leave it in eval mode
    settings = SamplingSettings(**{**SAMPLED.__dict__, "num_samples": 2})
    base = tokens(sample(model, tokenizer, prompt_ids[:3], settings, batch_size=2))
    with peft_model.disable_adapter():
        switched_off = tokens(sample(peft_model, tokenizer, prompt_ids[:3], settings, batch_size=6))
    adapter = tokens(sample(peft_model, tokenizer, prompt_ids[:3], settings, batch_size=6))
    assert switched_off == base
    assert adapter != base
    assert peft_model.training


def test_four_bit_base_on_cpu(llama_dir, tmp_path, tokenizer, prompt_ids):
    """The QLoRA model training uses: sampling works with the adapter on and off, does not depend
    on the batch, and turns off bitsandbytes' CPU weight repacking that would break training."""
    import bitsandbytes as bnb
    from conftest import make_config

    from lora_dpo.modeling import load_model

    model = load_model(make_config(llama_dir, tmp_path / "unused.jsonl", tmp_path / "out"), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as a model loaded without load_model's care would be
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, num_samples=2)
    one = tokens(sample(model, tokenizer, prompt_ids[:3], settings, batch_size=1))
    assert all(not layer.support_avx512bf16_for_cpu for layer in layers)
    assert tokens(sample(model, tokenizer, prompt_ids[:3], settings, batch_size=6)) == one
    with model.disable_adapter():
        base = sample(model, tokenizer, prompt_ids[:3], settings, batch_size=6)
    assert all(answer.num_tokens >= 1 for answers in base for answer in answers)
    assert model.training


def test_progress_bar_counts_prompts(model, tokenizer, prompt_ids, capsys):
    class Bar:
        n = 0

        def update(self, count):
            self.n += count

    bar = Bar()
    settings = SamplingSettings(max_new_tokens=2, num_samples=2)
    sample(model, tokenizer, prompt_ids, settings, batch_size=3, progress=bar)
    assert bar.n == len(prompt_ids)  # one per prompt, once all its samples are done
    sample(model, tokenizer, prompt_ids, settings, batch_size=3, progress=True)
    printed = capsys.readouterr().err
    assert "5/5" in printed and "prompt/s" in printed
