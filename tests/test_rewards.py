"""rewards: a tiny random-init reward model (Llama, one output, the demo tokenizer) scores the same
in batches as alone and reads each row's last real token; BOS is never doubled; wrong models are
refused with one line; the module:function backend and its errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lora_dpo.errors import LoraDpoError
from lora_dpo.rewards import FunctionReward, RewardModel, is_function_spec, load_reward

PROMPTS = ["Can you tell me about bread?", "Hi",
           [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why do people like owls?"}],
           "Give me a tip about chess, and then one more about the moon please."]
ANSWERS = ["Bread is baked from flour and water.", "Hello! How can I help you today, my friend?", "They look wise.",
           "No."]


def build_classifier(directory, llama_dir, num_labels=1, seed=0):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(llama_dir)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    # A random head gives scores near 0; a larger one makes differences between rows visible.
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, llama_dir):
    return build_classifier(tmp_path_factory.mktemp("rm") / "rm", llama_dir)


@pytest.fixture
def reward(reward_dir):
    return load_reward(str(reward_dir), device="cpu", batch_size=3)


def last_token_scores(reward: RewardModel, prompts, answers):
    """What a reward model means: the head applied to the hidden state of each input's last token,
    one input at a time, without padding."""
    scores = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([reward.encode(prompt, answer)])
            hidden = reward.model.model(input_ids=ids).last_hidden_state[0, -1]
            scores.append(reward.model.score(hidden).item())
    return scores


def test_batched_scores_are_those_of_each_input_alone(reward):
    batched = reward.score(PROMPTS, ANSWERS)
    alone = [reward.score([p], [a])[0] for p, a in zip(PROMPTS, ANSWERS)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert batched == pytest.approx(last_token_scores(reward, PROMPTS, ANSWERS), abs=1e-5)
    assert max(batched) - min(batched) > 0.1  # the rows really differ, so a mix-up would show
    assert reward.truncated == 0


def test_a_pad_id_that_ends_every_row_is_not_mistaken_for_padding(reward):
    """transformers' classifier reads the rightmost token that is not pad_token_id; here the pad id
    is the last token of every rendered input (the newline after <|im_end|>), as with pad = EOS on
    templates that end with EOS."""
    last = reward.encode(PROMPTS[0], ANSWERS[0])[-1]
    assert all(reward.encode(p, a)[-1] == last for p, a in zip(PROMPTS, ANSWERS))
    reward.tokenizer.pad_token = reward.tokenizer.convert_ids_to_tokens(last)
    reward.model.config.pad_token_id = last
    assert reward.score(PROMPTS, ANSWERS) == pytest.approx(last_token_scores(reward, PROMPTS, ANSWERS), abs=1e-5)
    assert reward.model.config.pad_token_id == last  # restored after the call


def test_bos_is_not_doubled(reward):
    fed = []
    hook = reward.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"]),
                                                  with_kwargs=True)
    try:
        reward.score(PROMPTS[:2], ANSWERS[:2])
    finally:
        hook.remove()
    bos = reward.tokenizer.bos_token_id
    rows = [row for batch in fed for row in batch.tolist()]
    assert len(rows) == 2
    for row in rows:
        assert row[0] == bos and row.count(bos) == 1
    text = reward.tokenizer.decode(reward.encode(PROMPTS[0], ANSWERS[0]))
    assert text == ("<|bos|><|im_start|>user\nCan you tell me about bread?<|im_end|>\n"
                    "<|im_start|>assistant\nBread is baked from flour and water.<|im_end|>\n")

    # Without a chat template: the (prompt, answer) text pair, BOS from the tokenizer, once.
    reward.tokenizer.chat_template = None
    ids = reward.encode("Hi", "Hello")
    assert ids[0] == bos and ids.count(bos) == 1 and reward.tokenizer.decode(ids) == "<|bos|>HiHello"
    with pytest.raises(LoraDpoError, match="has no chat template, and the prompts are chat messages"):
        reward.encode(PROMPTS[2], "x")


def test_long_inputs_keep_their_end(reward_dir):
    reward = load_reward(str(reward_dir), device="cpu")
    reward.max_length = 12
    full = reward.encode(PROMPTS[3], ANSWERS[3])
    assert len(full) > 12
    score = reward.score([PROMPTS[3]], [ANSWERS[3]])[0]
    with torch.no_grad():
        expected = reward.model(input_ids=torch.tensor([full[-12:]])).logits[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-6) and reward.truncated == 1


def test_four_bit_reward_model_on_cpu(reward_dir, reward):
    quantized = load_reward(str(reward_dir), device="cpu", four_bit=True, batch_size=4)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.model.modules())
    assert not isinstance(quantized.model.score, bnb.nn.Linear4bit)  # the head stays as trained
    scores = quantized.score(PROMPTS, ANSWERS)
    assert scores == pytest.approx([quantized.score([p], [a])[0] for p, a in zip(PROMPTS, ANSWERS)], abs=1e-4)
    assert all(math.isfinite(s) for s in scores)
    quantized.close()


def test_models_that_are_not_reward_models_are_refused(tmp_path, llama_dir):
    two = build_classifier(tmp_path / "two", llama_dir, num_labels=2)
    with pytest.raises(LoraDpoError) as error:
        load_reward(str(two), device="cpu", flag="--reward-model")
    assert str(error.value).startswith(f"--reward-model {two}: the model has 2 outputs (num_labels 2), a reward model has one.")
    with pytest.raises(LoraDpoError, match="not a reward model \\(its architectures: LlamaForCausalLM\\)"):
        load_reward(str(llama_dir), device="cpu")
    with pytest.raises(LoraDpoError, match="cannot read a model config from this directory"):
        load_reward(str(tmp_path), device="cpu")
    for message in (str(error.value),):
        assert "\n" not in message


REWARDS_PY = '''
import math

def length(prompt, answer):
    return float(len(answer))

def uses_prompt(prompt, answer):
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return len(set(text.split()) & set(answer.split()))

def text(prompt, answer):
    return "good"

def nan(prompt, answer):
    return math.nan

def boolean(prompt, answer):
    return True

def broken(prompt, answer):
    raise KeyError("score")

NOT_A_FUNCTION = 3
'''


def test_function_backend(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    by_file = load_reward(f"{path}:length")
    assert isinstance(by_file, FunctionReward)
    assert by_file.score(PROMPTS[:2], ["abc", "hello"]) == [3.0, 5.0]
    monkeypatch.chdir(tmp_path)  # module:function imports from the current directory, as python -m does
    by_module = load_reward("my_rewards:uses_prompt")
    assert by_module.score(PROMPTS[2:4], ["people like them", "a tip about the moon"]) == [2.0, 5.0]


@pytest.mark.parametrize("spec, message", [
    ("my_rewards:text", "--reward my_rewards:text returned 'good' (str) for the prompt 'Hi'. Fix: return a finite number"),
    ("my_rewards:nan", "--reward my_rewards:nan returned nan (float) for the prompt 'Hi'"),
    ("my_rewards:boolean", "--reward my_rewards:boolean returned True (bool)"),
    ("my_rewards:broken", "--reward my_rewards:broken raised KeyError: 'score' for the prompt 'Hi'. Fix: correct the function"),
    ("my_rewards:missing", "--reward my_rewards:missing: my_rewards has no 'missing' (it defines boolean, broken, length, "
                           "nan, text, uses_prompt). Fix: name a function defined there"),
    ("my_rewards:NOT_A_FUNCTION", "--reward my_rewards:NOT_A_FUNCTION: my_rewards.NOT_A_FUNCTION is a int, not a function"),
    ("no_such_module:f", "--reward no_such_module:f: no module named 'no_such_module'"),
    ("needs_missing:f", "--reward needs_missing:f: importing needs_missing failed (No module named 'not_installed_anywhere')"),
    ("nowhere/file.py:f", "--reward nowhere/file.py:f: nowhere/file.py not found"),
    ("bad_syntax.py:f", "--reward bad_syntax.py:f: running bad_syntax.py failed (SyntaxError"),
])
def test_function_backend_errors(tmp_path, monkeypatch, spec, message):
    for name in ("my_rewards", "needs_missing"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraDpoError) as error:
        load_reward(spec).score(["Hi"], ["Hello"])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_specs_pick_the_backend():
    assert is_function_spec("my_rewards:score") and is_function_spec("pkg.sub.mod:score")
    assert is_function_spec("path/to/file.py:score") and is_function_spec("C:\\work\\r.py:score")
    assert not is_function_spec("OpenAssistant/reward-model-deberta-v3-large-v2")
    assert not is_function_spec("./models/rm") and not is_function_spec("C:\\models\\rm")
    with pytest.raises(LoraDpoError, match="is a Python function, so 4-bit loading does not apply"):
        load_reward("my_rewards:score", four_bit=True)
