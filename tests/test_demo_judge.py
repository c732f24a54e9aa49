"""The demo's rule-based judge (lora_dpo.demo:kindness), which collection and evaluation use on the demo."""

from lora_dpo.demo import EVAL_TOPICS, TRAIN_TOPICS, demo_pairs, kindness


def test_kind_answers_score_above_zero_and_rude_ones_below():
    rows = demo_pairs(TRAIN_TOPICS + EVAL_TOPICS, 200, seed=5)
    assert all(kindness(row["prompt"], row["chosen"][0]["content"]) >= 4 for row in rows)
    assert all(kindness(row["prompt"], row["rejected"][0]["content"]) <= -2 for row in rows)


def test_phrases_count_once_and_unknown_text_is_neutral():
    # "yourself" is rude on its own ("Figure out X yourself") but part of a kind step here.
    assert kindness("", "Practise a little every day and be patient with yourself.") == 1.0
    assert kindness("", "Ugh. Figure out owls yourself. Go away.") == -3.0
    assert kindness("", "The weather is grey.") == 0.0
    assert kindness("", "Of course! Go away.") == 0.0
