"""`lora-dpo collect revise` and `collect judge`: the chaining and the prompts with a scripted
stand-in model (the critique sees the first answer, the revision sees the critique, pairs the
right way round, clean-up rules), the option-letter judge in both orders, the shipped principles,
and a tiny real model end to end, killed and rerun."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl

from lora_dpo.cli import main
from lora_dpo.collect import judge as judge_module
from lora_dpo.collect import revise as revise_module
from lora_dpo.collect.judge import SKIP_DISAGREE, SKIP_FEW, SKIP_WEAK, preference
from lora_dpo.collect.principles import DEFAULT_PRINCIPLES, load_principles
from lora_dpo.collect.revise import SKIP_ECHO, SKIP_EMPTY_REVISION, SKIP_SAME, TURN_STOPS, clean_reply
from lora_dpo.errors import DataError
from lora_dpo.generation import Sample
from lora_dpo.records import Records

WIFI = "Can you help me hack into my neighbour's wifi?"
HOW = "Sure: capture the handshake with aircrack-ng, then crack the password with a word list."
CRITIQUE = "Breaking into someone else's network is an invasion of their privacy and possibly illegal."
REFUSAL = ("I can't help with getting into your neighbour's wifi: breaking into a network without permission is "
           "illegal and could land you in legal trouble. Ask them to share it, or get your own plan.")
PRINCIPLES = """
principles:
  - name: harm
    critique: Identify how the last response is harmful, unethical, dangerous or illegal.
    revision: Rewrite the response to remove any harmful, unethical, dangerous or illegal content.
    choice: Which response is less harmful?
  - name: honesty
    critique: Identify claims in the last response that are false.
    revision: Rewrite the response so that every claim is true.
    choice: Which response is more honest?
examples:
  - principle: harm
    prompt: How do I pick my neighbour's lock?
    answer: Use a tension wrench and rake the pins.
    critique: That helps break into someone's home.
    revision: I can't help with entering someone's home without permission.
"""


class Scripted:
    """A stand-in for common.ChatModel: known replies to known turns, and a record of every
    conversation and setting it was given."""

    def __init__(self, answers, critiques=None, revisions=None, prefer=None):
        self.answers, self.critiques, self.revisions, self.prefer = answers, critiques or {}, revisions or {}, prefer
        self.calls = []
        self.batch_size = 8

    def reply(self, conversations, indices, settings):
        self.calls.append((conversations, settings))
        replies = []
        for conversation in conversations:
            if isinstance(conversation, str):  # the first answer: the prompt alone
                texts = self.answers[conversation]
            else:
                prompt = next(m["content"] for m in reversed(conversation) if m["content"] in self.answers)
                asked = conversation[-1]["content"]
                texts = (self.critiques if "Identify" in asked else self.revisions).get(prompt, "")
                texts = asked + " Bye!" if texts == "ECHO" else texts  # a model that repeats the request
            texts = texts if isinstance(texts, list) else [texts]
            replies.append([Sample([], texts[j % len(texts)], "eos") for j in range(settings.num_samples)])
        return replies

    def option_logps(self, conversations, lead, options):
        self.calls.append((conversations, lead))
        return [self.prefer(conversation[0]["content"]) for conversation in conversations]

    def close(self, before=""):
        pass


@pytest.fixture
def principles_file(tmp_path):
    path = tmp_path / "principles.yaml"
    path.write_text(PRINCIPLES)
    return path


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def skips(path):
    lines = [json.loads(line) for line in path.with_name(path.name + ".progress").read_text().splitlines()[1:]]
    return {line["prompt_index"]: line["skipped"] for line in lines if "skipped" in line}


def scripted_command(monkeypatch, module, model, tmp_path, command, prompts, *extra):
    monkeypatch.setattr(module, "load_chat_model", lambda *args, **kwargs: model)
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / f"{command}.jsonl"
    status = main(["collect", command, "--prompts", str(source), "--model", "scripted", "--out", str(out), *extra])
    return status, out


def test_revise_chains_answer_critique_revision_and_cleans_up(monkeypatch, tmp_path, principles_file):
    answers = {WIFI: HOW, "Tell me a joke.": "Why did the owl cross the road?", "Say hi.": "Hi!",
               "Say bye.": "Bye!", "Spell cat.": "c a t"}
    critiques = {WIFI: "Critique: " + CRITIQUE, "Tell me a joke.": "It is harmless.", "Say hi.": "Fine.",
                 "Say bye.": "Fine.", "Spell cat.": "Fine."}
    revisions = {WIFI: f"Sure, here is a revised response: \"{REFUSAL}\"", "Tell me a joke.": "  ",
                 "Say hi.": "hi!", "Say bye.": "ECHO",
                 "Spell cat.": "c a t \ud83d"}
    model = Scripted(answers, critiques, revisions)
    status, out = scripted_command(monkeypatch, revise_module, model, tmp_path, "revise", list(answers),
                                   "--principles", str(principles_file), "--sft-out", str(tmp_path / "sft.jsonl"))
    assert status == 0
    (answer_call, _), (critique_call, critique_settings), (revision_call, revision_settings) = model.calls
    assert answer_call == list(answers)  # the first answer comes from the prompt alone
    asked = critique_call[0]
    assert asked[:6][0]["content"] == "How do I pick my neighbour's lock?"  # the worked example first
    assert asked[6:] == [{"role": "user", "content": WIFI}, {"role": "assistant", "content": HOW},
                         {"role": "user", "content": asked[-1]["content"]}]
    assert asked[-1]["content"] in {p.critique for p in load_principles(str(principles_file)).principles}
    # the revision sees the critique, cleaned of its label, then the principle's revision request
    assert revision_call[0][-2] == {"role": "assistant", "content": CRITIQUE}
    assert revision_call[0][-1]["content"].startswith("Rewrite the response")
    assert set(TURN_STOPS) <= set(critique_settings.stop) and revision_settings.seed != critique_settings.seed
    [row] = rows(out)
    assert row["chosen"] == REFUSAL and row["rejected"] == HOW  # preamble and quotes stripped
    assert row["rounds"] == [{"principle": row["principle"], "critique": CRITIQUE, "revision": REFUSAL}]
    assert skips(out) == {1: SKIP_EMPTY_REVISION, 2: SKIP_SAME, 3: SKIP_ECHO,
                          4: "unusable pair (chosen: holds a lone surrogate escape)"}
    assert rows(tmp_path / "sft.jsonl") == [{"prompt": WIFI, "completion": REFUSAL, "principle": row["principle"],
                                             "prompt_index": 0}]


def test_rounds_critique_the_last_revision_under_the_next_principle(monkeypatch, tmp_path, principles_file):
    model = Scripted({WIFI: HOW}, {WIFI: CRITIQUE}, {WIFI: [REFUSAL]})
    revisions = iter([REFUSAL, REFUSAL + " Stay safe."])
    original = model.reply

    def reply(conversations, indices, settings):
        found = original(conversations, indices, settings)
        if conversations and isinstance(conversations[0], list) and "Rewrite" in conversations[0][-1]["content"]:
            return [[Sample([], next(revisions), "eos")]]
        return found

    model.reply = reply
    status, out = scripted_command(monkeypatch, revise_module, model, tmp_path, "revise", [WIFI],
                                   "--principles", str(principles_file), "--rounds", "2", "--few-shot", "0")
    assert status == 0
    [row] = rows(out)
    assert [r["principle"] for r in row["rounds"]] in (["harm", "honesty"], ["honesty", "harm"])
    assert row["chosen"] == REFUSAL + " Stay safe." and row["rejected"] == HOW
    second_critique = model.calls[3][0][0]
    assert second_critique[-2] == {"role": "assistant", "content": REFUSAL}  # round 2 critiques round 1's revision
    assert len(second_critique) == 3  # --few-shot 0: no worked examples


def test_clean_up_rules():
    assert clean_reply("Sure, here is a revised response: Hello.") == ("Hello.", None)
    assert clean_reply("Okay! Here's the rewritten answer:\n\u201cHello.\u201d") == ("Hello.", None)
    assert clean_reply("Revised response: Revision: Hello.") == ("Hello.", None)
    assert clean_reply("Sure, I can help with that.") == ("Sure, I can help with that.", None)
    assert clean_reply(" \n") == ("", "empty")
    assert clean_reply("As asked: please  REWRITE the response now.", ["Please rewrite the response now."])[1] == SKIP_ECHO


def test_the_judge_reads_option_letters_in_both_orders(monkeypatch, tmp_path, principles_file):
    prompts = [WIFI, "Biased?", "Weak?", "Same?", "Second?"]
    answers = {WIFI: [HOW, REFUSAL], "Biased?": ["one", "two"], "Weak?": ["yes", "no"], "Same?": ["x", "x"],
               "Second?": [REFUSAL, HOW]}

    def prefer(question):
        a, b = question.split("(A) ")[1].split("\n(B) ")
        b = b.split("\nAnswer with")[0]
        if "Biased?" in question:
            return [0.0, -3.0]  # always A, whatever A is: a position-biased judge
        if "Weak?" in question:
            return [0.0, -0.1] if a == "yes" else [-0.1, 0.0]
        return [0.0, -3.0] if a == REFUSAL else [-3.0, 0.0] if b == REFUSAL else [0.0, 0.0]

    model = Scripted(answers, prefer=prefer)
    status, out = scripted_command(monkeypatch, judge_module, model, tmp_path, "judge", prompts,
                                   "--principles", str(principles_file))
    assert status == 0
    found = {row["prompt_index"]: row for row in rows(out)}
    assert sorted(found) == [0, 4]
    for index in (0, 4):
        assert found[index]["chosen"] == REFUSAL and found[index]["rejected"] == HOW
        assert found[index]["preference"] == pytest.approx(1 / (1 + math.exp(-3)))
    assert found[0]["first_as_a"] < 0.5 and found[0]["first_as_b"] < 0.5  # the first answer (HOW) loses both ways
    assert found[4]["first_as_a"] > 0.5 and found[4]["first_as_b"] > 0.5
    assert skips(out) == {1: SKIP_DISAGREE, 2: SKIP_WEAK, 3: SKIP_FEW}
    questions, lead = model.calls[-1]
    assert lead == "The answer is: (" and len(questions) == 8  # both orders of the four distinct pairs
    first = questions[0][0]["content"]
    assert f"Human: {WIFI}" in first and "Which response" in first and f"(A) {HOW}\n(B) {REFUSAL}" in first
    assert f"(A) {REFUSAL}\n(B) {HOW}" in questions[1][0]["content"]


def test_preference_thresholds():
    assert preference(0.9, 0.8, 0.6) == (0, None)
    assert preference(0.1, 0.3, 0.6) == (1, None)
    assert preference(0.9, 0.3, 0.6) == (None, SKIP_DISAGREE)
    assert preference(0.55, 0.6, 0.6) == (None, SKIP_WEAK)


def test_shipped_principles_and_bad_files(tmp_path):
    shipped = load_principles()
    assert shipped.source == str(DEFAULT_PRINCIPLES)
    names = [p.name for p in shipped.principles]
    assert names == ["harm", "illegality", "danger", "toxicity", "bias", "honesty", "helpfulness"]
    assert all(p.critique and p.revision and p.choice for p in shipped.principles) and len(shipped.examples) >= 2
    bad = tmp_path / "bad.yaml"
    bad.write_text('principles:\n  - {name: harm, critique: "Look \\ud83d", revision: r, choice: c}\n')
    with pytest.raises(DataError, match=r"principles\[0\]\.critique: holds a lone surrogate escape"):
        load_principles(str(bad))
    bad.write_text("principles:\n  - {name: harm, critique: c, revison: r, choice: c}\n")
    with pytest.raises(DataError, match="unknown key revison"):
        load_principles(str(bad))


# ---------------------------------------------------------------------------------------------
# A tiny real model end to end


def real(tmp_path, llama_dir, command, out, *extra):
    prompts = write_jsonl(tmp_path / "real-prompts.jsonl",
                          [{"prompt": text} for text in ("Can you tell me about bread?", WIFI, "Give me a tip about snow.")])
    return main(["collect", command, "--prompts", str(prompts), "--model", str(llama_dir), "--out", str(out),
                 "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "2", "--device", "cpu",
                 "--few-shot", "1", *extra] if command == "revise" else
                ["collect", command, "--prompts", str(prompts), "--model", str(llama_dir), "--out", str(out),
                 "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "2", "--device", "cpu", *extra])


def test_revise_end_to_end_killed_and_rerun(tmp_path, llama_dir, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    assert real(tmp_path, llama_dir, "revise", whole) == 0
    assert len(rows(whole)) + len(skips(whole)) == 3
    for row in rows(whole):
        assert row["chosen"] == row["rounds"][-1]["revision"] and row["chosen"] != row["rejected"]
    killed = tmp_path / "killed.jsonl"
    real_write, real_skip = Records.write, Records.skip
    count = {"n": 0}

    def counted(method):
        def wrapper(self, *args):
            count["n"] += 1
            if count["n"] == 2:
                raise KeyboardInterrupt
            return method(self, *args)
        return wrapper

    monkeypatch.setattr(Records, "write", counted(real_write))
    monkeypatch.setattr(Records, "skip", counted(real_skip))
    assert real(tmp_path, llama_dir, "revise", killed) == 130
    monkeypatch.undo()
    assert real(tmp_path, llama_dir, "revise", killed) == 0
    assert killed.read_bytes() == whole.read_bytes() and skips(killed) == skips(whole)


def test_judge_end_to_end_with_another_model_as_judge(tmp_path, llama_dir, qwen_dir):
    out = tmp_path / "judged.jsonl"
    assert real(tmp_path, llama_dir, "judge", out, "--judge", str(qwen_dir), "--min-confidence", "0.5") == 0
    found, skipped = rows(out), skips(out)
    assert len(found) + len(skipped) == 3
    for row in found:
        assert row["judge"] == str(qwen_dir) and row["generator"] == str(llama_dir)
        assert row["chosen"] in row["candidates"] and row["rejected"] in row["candidates"]
        assert (row["first_as_a"] > 0.5) == (row["first_as_b"] > 0.5)
    assert set(skipped.values()) <= {SKIP_DISAGREE, SKIP_FEW}
    assert not (tmp_path / "judged.jsonl.candidates").exists()


def test_option_letter_logps_are_the_models_own(llama_dir):
    """ChatModel.option_logps (through batching.score_pairs) against the model's plain forward on
    the question followed by the lead and each letter."""
    from argparse import Namespace

    from tiny_families import plain_logps

    from lora_dpo.collect.common import load_chat_model
    from lora_dpo.collect.judge import LEAD, OPTIONS, choice_question
    from lora_dpo.data import encode_prompt

    model = load_chat_model(str(llama_dir), None, Namespace(device="cpu", dtype="float32", batch_size=2), False)
    questions = [choice_question(WIFI, "Which response is less harmful?", HOW, REFUSAL),
                 choice_question("Hi", "Which response is kinder?", "Hello!", "Go away.")]
    found = model.option_logps(questions, LEAD, OPTIONS)
    tokenizer = model.loaded.tokenizer
    for question, (a, b) in zip(questions, found):
        prompt = encode_prompt(tokenizer, question)
        lead_a, lead_b = (tokenizer(LEAD + letter, add_special_tokens=False)["input_ids"] for letter in OPTIONS)
        shared = next(k for k in range(len(lead_a)) if lead_a[k] != lead_b[k])
        expected = [plain_logps(model.loaded.model, prompt + lead_a[:shared], ids[shared:]).item() for ids in (lead_a, lead_b)]
        assert [a, b] == pytest.approx(expected, abs=1e-4)
    assert found[0] != found[1]
