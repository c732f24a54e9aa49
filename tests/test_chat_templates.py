"""Where a response starts and ends, with the chat templates of real model families (offline
tokenizers built in tests/chat_templates.py): a response is the assistant's text plus its end-of-turn
token, and the prompt training uses is exactly the prompt generation gets from encode_prompt."""

from __future__ import annotations

import pytest
from chat_templates import STYLES, assistant, demo_tokenizer, style_tokenizer, user
from conftest import write_jsonl

from lora_dpo.data import (DataReport, PreferenceExample, encode_prompt, load_examples, render, tokenize_examples)
from lora_dpo.errors import DataError

COLUMNS = ("prompt", "chosen", "rejected")
PROMPTS = {
    "single turn": [user("Tell me about tea.")],
    "multi turn": [user("Hi."), assistant("Hello! How can I help?"), user("Tell me about tea.")],
}


def tokenize_one(example, tokenizer, **options):
    (pair,) = tokenize_examples([example], tokenizer, 512, 256, DataReport("x"), **options)
    return pair


@pytest.mark.parametrize("turns", sorted(PROMPTS))
@pytest.mark.parametrize("name", sorted(STYLES))
def test_response_is_the_answer_and_its_end_of_turn(name, turns):
    style, tokenizer = STYLES[name], style_tokenizer(name)
    prompt = PROMPTS[turns]
    example = PreferenceExample(prompt, [assistant("Tea is lovely.")], [assistant("No.")], "x:1")
    pair = tokenize_one(example, tokenizer)
    turn_end = tokenizer.convert_tokens_to_ids(style.turn_end)
    for ids, text in ((pair.chosen_ids, "Tea is lovely."), (pair.rejected_ids, "No.")):
        assert tokenizer.decode(ids) == style.answer_lead + text + style.turn_end
        assert ids[-1] == turn_end and ids.count(turn_end) == 1  # nothing after the end of turn is scored
    # The prompt is what generation sees: the template's generation prompt, asked for a plain answer.
    generation = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                               **style.generation_options)
    assert pair.prompt_ids == tokenizer(generation, add_special_tokens=False).input_ids
    assert pair.prompt_ids == encode_prompt(tokenizer, prompt)
    # Prompt + response is the rendered conversation, less only what follows the end of turn.
    full = tokenizer.apply_chat_template(prompt + example.chosen, tokenize=False)
    assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids) + style.after_turn == full


def test_qwen3_boundaries():
    """The token boundaries docs/data.md shows: the empty think block is prompt, the newline after
    <|im_end|> is nothing."""
    tokenizer = style_tokenizer("qwen3")
    example = PreferenceExample([user("Tell me about tea.")], [assistant("Tea is lovely.")], [assistant("No.")], "x:1")
    rendered = render(example, tokenizer)
    assert rendered.prompt == "<|im_start|>user\nTell me about tea.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert (rendered.chosen, rendered.rejected) == ("Tea is lovely.<|im_end|>", "No.<|im_end|>")
    assert not rendered.append_eos


def test_qwen3_answers_with_their_own_thinking_follow_the_bare_generation_prompt():
    tokenizer = style_tokenizer("qwen3")
    prompt = [user("Tell me about tea.")]
    thinking = assistant("<think>\nThey want facts.\n</think>\n\nTea is lovely.")
    pair = tokenize_one(PreferenceExample(prompt, [thinking], [assistant("No.")], "x:1"), tokenizer)
    generation = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert generation.endswith("<|im_start|>assistant\n")
    assert pair.prompt_ids == tokenizer(generation, add_special_tokens=False).input_ids
    assert tokenizer.decode(pair.chosen_ids) == "<think>\nThey want facts.\n</think>\n\nTea is lovely.<|im_end|>"
    assert tokenizer.decode(pair.rejected_ids) == "<think>\n\n</think>\n\nNo.<|im_end|>"


def test_tool_calls_and_other_message_keys_reach_the_template(tmp_path):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = {"prompt": [user("Weather in Paris?"), assistant("", tool_calls=[call]),
                      {"role": "tool", "content": "18 C", "name": "get_weather"}],
           "chosen": [assistant("It is 18 C in Paris.")], "rejected": [assistant("No idea.")]}
    (example,) = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [row])), "train", COLUMNS, "error", DataReport("d"))
    assert example.prompt[1]["tool_calls"] == [call] and example.prompt[2]["name"] == "get_weather"
    rendered = render(example, style_tokenizer("qwen2.5"))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered.prompt
    assert rendered.prompt.endswith("<tool_response>\n18 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # A turn that only calls a tool may have null content; null keys are dropped (Arrow files hold
    # every key in every message), so templates that test "'tool_calls' in message" see none.
    calls_only = {"prompt": [user("Weather?")], "chosen": [assistant(None, tool_calls=[call])],
                  "rejected": [{"role": "assistant", "content": "Sunny.", "tool_calls": None}]}
    (example,) = load_examples(str(write_jsonl(tmp_path / "e.jsonl", [calls_only])), "train", COLUMNS, "error",
                               DataReport("e"))
    assert example.chosen == [assistant("", tool_calls=[call])] and example.rejected == [assistant("Sunny.")]
    rendered = render(example, style_tokenizer("llama3"))
    assert rendered.chosen == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert rendered.rejected == "Sunny.<|eot_id|>"


def test_a_row_the_template_rejects_is_one_line_or_a_counted_skip():
    tokenizer = style_tokenizer("gemma2")  # Gemma 2 has no system role
    bad = PreferenceExample([{"role": "system", "content": "Be kind."}, user("Hi")], [assistant("Hello!")],
                            [assistant("Go.")], "d.jsonl:1")
    good = PreferenceExample([user("Hi")], [assistant("Hello!")], [assistant("Go.")], "d.jsonl:2")
    with pytest.raises(DataError) as info:
        tokenize_examples([bad, good], tokenizer, 128, 64, DataReport("d"))
    message = str(info.value)
    assert message.startswith("d.jsonl:1: the chat template cannot render this conversation (System role not supported)")
    assert "\n" not in message and "data.on_bad_row=skip" in message
    report = DataReport("d", rows=2)
    assert len(tokenize_examples([bad, good], tokenizer, 128, 64, report, on_bad_row="skip")) == 1
    assert report.skipped == 1 and "1 bad rows skipped" in report.summary()


def test_a_template_without_a_turn_end_token_gets_the_eos():
    tokenizer = style_tokenizer("chatml")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    pair = tokenize_one(PreferenceExample([user("Hi")], [assistant("Hello!")], [assistant("Go.")], "x:1"), tokenizer)
    assert tokenizer.decode(pair.prompt_ids) == "user: Hi\nassistant:"  # the space is the answer's, as generated
    assert tokenizer.decode(pair.chosen_ids) == " Hello!<|im_end|>" and pair.chosen_ids[-1] == tokenizer.eos_token_id


def test_a_template_that_renders_the_prompt_differently_once_a_response_follows():
    tokenizer = style_tokenizer("chatml")
    tokenizer.chat_template = ("{% if messages[-1]['content'] | length > 30 %}(long answer)\n{% endif %}"
                               + tokenizer.chat_template)
    example = PreferenceExample([user("Hi")], [assistant("Hello! " * 10)], [assistant("Go.")], "d.jsonl:4")
    with pytest.raises(DataError, match=r"^d.jsonl:4: the chat template renders the prompt differently once a "
                                        r"response follows, so the response cannot be separated\. Fix: give the rows as plain text"):
        render(example, tokenizer)


def test_encode_prompt_contract():
    chatml, tokenizer = style_tokenizer("chatml"), demo_tokenizer()
    # Text is one user message when the chat template is on, and plain text (with BOS) when it is off.
    assert encode_prompt(chatml, "Tell me about tea.") == encode_prompt(chatml, [user("Tell me about tea.")])
    assert encode_prompt(tokenizer, "Tell me about tea.", chat_template=False) == tokenizer("Tell me about tea.").input_ids
    plain = PreferenceExample("Tell me about tea.", " Tea is lovely.", " No.", "x:1")
    assert tokenize_one(plain, tokenizer).prompt_ids == encode_prompt(tokenizer, "Tell me about tea.", chat_template=False)
    for prompt, options, words in [
        ([user("Hi")], {"chat_template": False}, "prompt: a list of chat messages but chat templates are switched off"),
        ([user("Hi"), assistant("Hello")], {}, "prompt: ends with an assistant message"),
        ("tell me \ud83d", {}, "prompt: field 'prompt': holds a lone surrogate escape \\ud83d at character 8"),
        ("   ", {}, "is empty or whitespace only"),
    ]:
        with pytest.raises(DataError) as info:
            encode_prompt(chatml, prompt, **options)
        assert words in str(info.value) and "Fix:" in str(info.value)
    chatml.chat_template = None
    with pytest.raises(DataError, match="but the tokenizer has no chat template"):
        encode_prompt(chatml, [user("Hi")])

