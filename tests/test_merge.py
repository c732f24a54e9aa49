"""`lora-dpo merge`: the merged model equals base + adapter, the dequantized variant reproduces the
4-bit model that was trained, the output directory and report are complete, and mistakes fail cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.cli import main
from lora_dpo.demo import EVAL_TOPICS, build_demo_base, demo_pairs

TEXT = "Can you tell me about bread? Of course! Bread is a wonderful subject."


@pytest.fixture(scope="module")
def run16(tmp_path_factory, llama_dir, demo_rows):
    """An adapter trained on the float32 base; 8 of its 32 pairs held out by the seeded split; a checkpoint at step 2."""
    from lora_dpo.train import train

    tmp = tmp_path_factory.mktemp("run16")
    # A large learning rate makes the adapter move the logits far more than any tolerance below.
    train(make_config(llama_dir, write_jsonl(tmp / "t.jsonl", demo_rows), tmp / "run", "model.load_in_4bit=false",
                      "train.learning_rate=5e-2", "data.eval_fraction=0.25", "train.save_every=2"), progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def run4(tmp_path_factory, llama_dir, demo_rows):
    """An adapter trained on the 4-bit NF4 base (double quant), with a separate eval file."""
    from lora_dpo.train import train

    tmp = tmp_path_factory.mktemp("run4")
    eval_file = write_jsonl(tmp / "eval.jsonl", demo_pairs(EVAL_TOPICS, 6, seed=5))
    train(make_config(llama_dir, write_jsonl(tmp / "t.jsonl", demo_rows), tmp / "run", "model.load_in_4bit=true",
                      "train.learning_rate=5e-2", f"data.eval_file={eval_file}"), progress=False)
    return tmp / "run"


def scaled_copy(run, destination, scale):
    """``run`` with its adapter's update s*B@A scaled by ``scale`` (lora_B scaled): same base, data and config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(str(run / "adapter_model.safetensors"))
    save_file({k: v * scale if ".lora_B." in k else v for k, v in weights.items()},
              str(destination / "adapter_model.safetensors"))
    return destination


@pytest.fixture(scope="module")
def small4(run4, tmp_path_factory):
    """A 4-bit-trained adapter as small as the shipped configs' rate leaves one after a few steps:
    run4's update scaled by 1e-4 moves the held-out log-probs by about 8e-5 nats per token (10 steps
    at learning rate 5e-6 measured 4e-4 on this model). Scaled rather than trained: seconds, not a minute."""
    return scaled_copy(run4, tmp_path_factory.mktemp("small4") / "run", 1e-4)


def logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def four_bit_with_adapter(base_dir, adapter_dir):
    """The model training optimised, built with transformers/bitsandbytes/peft directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_dpo.modeling import keep_cpu_4bit_trainable

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quant,
                                                device_map={"": "cpu"})
    keep_cpu_4bit_trainable(base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def partial_dirs(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_fp32_merge_equals_base_plus_adapter(run16, llama_dir, tokenizer, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "merged"
    assert main(["merge", str(run16), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "merge_report.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}
    assert partial_dirs(tmp_path) == []
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # auto: as the base was saved

    merged = logits(load_plain(out), tokenizer)
    reference = logits(PeftModel.from_pretrained(load_plain(llama_dir), str(run16)).eval(), tokenizer)
    base = logits(load_plain(llama_dir), tokenizer)
    assert (merged - reference).abs().max() < 1e-4
    assert (base - reference).abs().max() > 0.05  # the adapter matters, so the merge was not a no-op

    report = json.loads((out / "merge_report.json").read_text())
    check = report["verification"]
    assert report["base_weights"] == "original" and report["trained_in_4bit"] is False and report["shards"] == 1
    assert check["pairs"] == 8 and "held-out share 0.25" in check["data"]  # the run's own seeded split
    assert check["reference"].startswith("16-bit base + adapter")
    assert check["logp_abs_diff_max"] < 1e-3 and check["logp_abs_diff_per_token"] < 1e-5
    assert check["decision_agreement"] == 1.0 and check["flipped_pairs"] == []
    assert check["adapter_effect_per_token"] > 0.05 and check["adapter_kept"] > 1 - 1e-4  # exact merge
    assert check["adapter_error_per_token"] == pytest.approx(check["logp_abs_diff_per_token"], abs=1e-6)
    assert check["passed"] is True and check["warning"] is None
    assert "verification on 8 held-out pairs" in printed and "WARNING" not in printed
    assert "of which the merge keeps 100.0% (at least 75% required)" in printed


def test_dequantized_merge_reproduces_the_trained_4bit_model(run4, llama_dir, tokenizer, tmp_path):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from lora_dpo.merge import merge_adapter

    out = tmp_path / "merged"
    assert main(["merge", str(run4), "--out", str(out), "--base-weights", "dequantized", "--max-shard-size", "100KB"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    merged_model = load_plain(out)  # transformers alone reassembles the shards

    trained = four_bit_with_adapter(llama_dir, run4)
    trained_logits = logits(trained, tokenizer)
    dequantized_gap = (logits(merged_model, tokenizer) - trained_logits).abs().max()
    original = merge_adapter(run4, tmp_path / "original", verify=False)
    assert original.verification is None
    original_gap = (logits(load_plain(tmp_path / "original"), tokenizer) - trained_logits).abs().max()
    assert dequantized_gap < 1e-4
    assert original_gap > 100 * dequantized_gap  # the naive merge is a different model

    # Every linear weight is dequant(W_nf4) + (alpha / r) * B @ A.
    adapter = load_file(str(run4 / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    quantized = trained.get_base_model().get_submodule(name).base_layer
    assert isinstance(quantized, bnb.nn.Linear4bit)
    dequantized = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    expected = dequantized + (32.0 / 8) * b @ a
    assert torch.allclose(merged_model.get_submodule(name).weight, expected, atol=1e-6)

    report = json.loads((out / "merge_report.json").read_text())
    assert report["dequantized_layers"] == 2 * 7 and report["shards"] == len(shards)
    check = report["verification"]
    assert check["reference"].startswith("4-bit NF4 base + adapter") and check["pairs"] == 6
    assert check["data"].endswith("eval.jsonl") and check["passed"] is True
    assert check["logp_abs_diff_per_token"] < 1e-5 and check["adapter_kept"] > 1 - 1e-4


def test_original_merge_of_a_4bit_adapter_reports_the_gap(run4, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "merged"
    assert main(["merge", str(run4), "--out", str(out), "--dtype", "bfloat16", "--verify-pairs", "4",
                 "--max-logp-diff", "1e-4"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: the merged model does not behave like the trained base + adapter" in printed
    assert "--base-weights dequantized" in printed
    report = json.loads((out / "merge_report.json").read_text())
    check = report["verification"]
    assert set(check) == {"reference", "data", "pairs", "logp_abs_diff_mean", "logp_abs_diff_max",
                          "logp_abs_diff_per_token", "adapter_effect_per_token", "adapter_error_per_token",
                          "adapter_kept", "decision_agreement", "flipped_pairs", "reference_accuracy",
                          "merged_accuracy", "max_logp_diff", "min_adapter_kept", "passed", "warning"}
    assert check["pairs"] == 4 and check["max_logp_diff"] == 1e-4 and check["min_adapter_kept"] == 0.75
    assert check["logp_abs_diff_per_token"] > 1e-4 and check["passed"] is False and "nats per token" in check["warning"]
    # A large adapter survives bfloat16 rounding: the model differs from the trained one (a warning),
    # but it still does what the adapter does (no failure).
    assert check["adapter_effect_per_token"] > 0.05 and check["adapter_kept"] > 0.9
    assert check["logp_abs_diff_max"] >= check["logp_abs_diff_mean"] > 0
    assert report["dtype"] == "bfloat16" and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}


def test_merge_that_drops_a_small_adapter_fails_and_writes_nothing(small4, tmp_path, monkeypatch):
    """The merged model is the bare base: it differs from the trained model by only the adapter's
    small effect, far under the absolute threshold, so only comparing with that effect catches it."""
    from peft.tuners.lora import LoraModel

    from lora_dpo.merge import MergeCheckFailed, merge_adapter

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
    with pytest.raises(MergeCheckFailed) as failed:
        merge_adapter(small4, out, overwrite=True)
    check = failed.value.verification
    assert check.adapter_kept == 0 and check.adapter_lost and check.passed is False  # exactly the base's scores
    assert 1e-5 < check.adapter_effect_per_token == check.adapter_error_per_token
    assert check.logp_abs_diff_per_token < 0.01  # what the absolute check alone passed
    message = str(failed.value)
    assert f"{small4}: the merged model keeps 0% of what the adapter changes on 6 held-out pairs" in message
    assert f"so nothing was written to {out}" in message and "--no-verify saves the merge unchecked" in message
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and partial_dirs(tmp_path) == []


def test_bfloat16_merge_that_rounds_a_small_adapter_away_fails(small4, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(small4), "--out", str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "of what the adapter changes on 6 held-out pairs" in err
    assert "Fix: merge with --dtype float32 (bfloat16 rounding loses most of an update this small)" in err
    assert not out.exists() and partial_dirs(tmp_path) == []


def test_correct_merge_of_a_small_adapter_passes_with_both_figures(small4, tmp_path, capsys):
    """The default merge (original weights, float32) of a small 4-bit-trained adapter: the merged
    model differs from the trained 4-bit one by the quantization gap, dozens of times the adapter's
    effect, yet it keeps that effect; the dequantized merge keeps it exactly."""
    out = tmp_path / "merged"
    assert main(["merge", str(small4), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    effect, error = check["adapter_effect_per_token"], check["adapter_error_per_token"]
    assert 1e-5 < effect < 1e-3 and check["logp_abs_diff_per_token"] > 10 * effect
    assert check["adapter_kept"] == pytest.approx(1 - error / effect) and check["adapter_kept"] > 0.9
    assert check["passed"] is True and check["warning"] is None
    assert f"adapter effect: {effect:.4g} nats per token, of which the merge keeps" in printed

    exact = tmp_path / "exact"
    assert main(["merge", str(small4), "--out", str(exact), "--base-weights", "dequantized"]) == 0
    check = json.loads((exact / "merge_report.json").read_text())["verification"]
    assert check["adapter_effect_per_token"] == pytest.approx(effect, rel=1e-4)
    assert check["adapter_kept"] > 0.99 and check["logp_abs_diff_per_token"] < 1e-6  # float32 rounding only


def test_adapter_that_changes_nothing_is_reported_not_divided_by_zero(run4, tmp_path, capsys):
    noop = scaled_copy(run4, tmp_path / "noop", 0.0)  # B = 0: what an adapter is before its first step
    out = tmp_path / "merged"
    assert main(["merge", str(noop), "--out", str(out), "--base-weights", "dequantized"]) == 0
    printed = capsys.readouterr().out
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    assert check["adapter_effect_per_token"] == 0 and check["adapter_kept"] is None
    assert check["passed"] is True and "too little to tell whether the merge kept it" in check["warning"]
    assert "too small to measure what the merge kept" in printed and "WARNING: the adapter changes" in printed


def test_verification_figures_by_hand():
    from lora_dpo.batching import PairLogps
    from lora_dpo.merge import compare_scores

    def scores(chosen, rejected, tokens=(5, 5)):
        return PairLogps(torch.tensor(chosen), torch.tensor(rejected), torch.tensor([tokens[0]] * len(chosen)),
                         torch.tensor([tokens[1]] * len(rejected)))

    # Two pairs, 20 response tokens, values exact in float32. The adapter adds +0.25 to each chosen
    # and -0.25 to each rejected log-prob: effect 4 x 0.25 / 20 = 0.05 per token.
    base = scores([-10.0, -12.0], [-11.0, -13.0])
    trained = scores([-9.75, -11.75], [-11.25, -13.25])
    kwargs = dict(reference_name="r", data_name="d")
    # A merge into other base weights (every log-prob 0.5 lower) that keeps the adapter's change exactly.
    shifted_base = scores([-10.5, -12.5], [-11.5, -13.5])
    shifted = scores([-10.25, -12.25], [-11.75, -13.75])
    check = compare_scores(trained, base, shifted, shifted_base, **kwargs)
    assert check.adapter_effect_per_token == 0.05 and check.adapter_error_per_token == 0 and check.adapter_kept == 1
    assert check.logp_abs_diff_per_token == 0.1  # the base gap: a warning, not a failure
    assert not check.adapter_lost and check.passed is False and "0.1 nats per token" in check.warning
    # Dropped: the merged model is its base. Half kept: the merge moves each log-prob by 0.125.
    dropped = compare_scores(trained, base, base, base, **kwargs)
    assert dropped.adapter_kept == 0 and dropped.adapter_lost
    assert dropped.logp_abs_diff_per_token == 0.05  # M = E: under a 0.1 threshold it would pass
    half_kept = scores([-9.875, -11.875], [-11.125, -13.125])
    half = compare_scores(trained, base, half_kept, base, **kwargs)
    assert half.adapter_kept == 0.5 and half.adapter_lost
    assert not compare_scores(trained, base, half_kept, base, min_adapter_kept=0.5, **kwargs).adapter_lost
    nan = compare_scores(trained, base, scores([float("nan"), -11.875], [-11.125, -13.125]), base, **kwargs)
    assert nan.adapter_lost and nan.passed is False
    nothing = compare_scores(base, base, shifted_base, shifted_base, **kwargs)
    assert nothing.adapter_effect_per_token == 0 and nothing.adapter_kept is None and not nothing.adapter_lost


def test_checkpoint_directory_uses_its_runs_config(run16, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(run16 / "checkpoint-2"), "--out", str(out)]) == 0
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    assert check["pairs"] == 8 and check["passed"] is True
    assert (out / "tokenizer.json").is_file()


def test_output_directory_rules(run16, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(run16), "--out", str(out), "--no-verify"]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    assert main(["merge", str(run16), "--out", str(out), "--no-verify", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "merge_report.json").read_text())["verification"] is None
    assert partial_dirs(tmp_path) == []

    for target in (run16, run16.parent):  # the adapter itself, or a directory holding it
        assert main(["merge", str(run16), "--out", str(target), "--overwrite", "--no-verify"]) == 2
        assert "an input of this merge" in capsys.readouterr().err
    assert (run16 / "adapter_model.safetensors").is_file()

    (tmp_path / "file").write_text("x")
    assert main(["merge", str(run16), "--out", str(tmp_path / "file"), "--no-verify"]) == 2
    assert "is a file" in capsys.readouterr().err

    assert main(["merge", str(run16), "--out", str(tmp_path / "d"), "--base-weights", "dequantized"]) == 2
    assert "trained on a 16-bit base" in capsys.readouterr().err


def test_adapter_that_does_not_fit_the_base(run16, tmp_path, capsys):
    wide = build_demo_base(tmp_path / "wide", hidden_size=128, layers=2)
    out = tmp_path / "merged"
    assert main(["merge", str(run16), "--out", str(out), "--base", str(wide), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the adapter does not fit the base" in err and "size mismatch" in err and "Fix: pass --base" in err
    assert not out.exists() and partial_dirs(tmp_path) == []

    assert main(["merge", str(run16), "--out", str(out), "--base", str(tmp_path / "nowhere")]) == 2
    assert "cannot load the base model" in capsys.readouterr().err


def test_corrupted_adapter_files(run16, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run16, bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # cut off mid-header
    out = tmp_path / "merged"
    assert main(["merge", str(bad), "--out", str(out)]) == 2
    assert "looks corrupted or cut off" in capsys.readouterr().err and not out.exists()

    from safetensors.torch import load_file, save_file

    complete = load_file(str(run16 / "adapter_model.safetensors"))
    partial = {k: v for k, v in complete.items() if ".layers.1." not in k}  # a valid file missing layer 1
    save_file(partial, str(weights))
    assert main(["merge", str(bad), "--out", str(out), "--no-verify"]) == 2
    assert "the adapter weights do not match the layers it adapts" in capsys.readouterr().err and not out.exists()

    diverged = dict(complete)
    first = sorted(diverged)[0]
    diverged[first] = torch.full_like(diverged[first], float("nan"))
    save_file(diverged, str(weights))
    assert main(["merge", str(bad), "--out", str(out)]) == 2
    assert f"hold NaN or inf (first: {first}), training diverged" in capsys.readouterr().err

    (bad / "adapter_config.json").write_text("{not json")
    assert main(["merge", str(bad), "--out", str(out)]) == 2
    assert "adapter_config.json: not valid JSON" in capsys.readouterr().err

    assert main(["merge", str(tmp_path), "--out", str(out)]) == 2
    assert "no adapter_config.json here" in capsys.readouterr().err


def test_adapter_without_its_run_needs_verify_data(run4, tmp_path, demo_rows, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run4 / name, bare / name)
    out = tmp_path / "merged"
    assert main(["merge", str(bare), "--out", str(out)]) == 2
    assert "pass --verify-data FILE, or --no-verify" in capsys.readouterr().err

    missing = tmp_path / "missing.jsonl"
    assert main(["merge", str(bare), "--out", str(out), "--verify-data", str(missing)]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err

    pairs = write_jsonl(tmp_path / "pairs.jsonl", demo_rows[:3])
    assert main(["merge", str(bare), "--out", str(out), "--verify-data", str(pairs)]) == 0
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    # Without config.yaml the project defaults apply: the reference is the 4-bit NF4 base.
    assert check["data"] == str(pairs) and check["pairs"] == 3 and check["reference"].startswith("4-bit NF4")
    assert (out / "tokenizer.json").is_file()  # taken from the base


def test_a_failure_leaves_no_partial_output(run16, tmp_path, monkeypatch):
    from lora_dpo import merge

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge, "_score_saved", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        merge.merge_adapter(run16, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old --out survives a failed merge
    assert partial_dirs(tmp_path) == []


@pytest.mark.parametrize("size, problem", [("lots", "not a size"), ("5GiB", "not a size"), ("infGB", "not a size"),
                                           ("0GB", "must be positive"), ("-1MB", "must be positive")])
def test_bad_max_shard_size_fails_before_anything_loads(run16, tmp_path, monkeypatch, capsys, size, problem):
    from lora_dpo import merge

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --max-shard-size was checked")

    monkeypatch.setattr(merge, "load_base", no_loading)
    out = tmp_path / "merged"
    assert main(["merge", str(run16), "--out", str(out), f"--max-shard-size={size}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lora-dpo: error: --max-shard-size {size!r}: {problem}. Fix: give a positive number with a unit, "
                   "e.g. 2GB or 500MB (units: TB, GB, MB, KB)")
    assert not out.exists() and partial_dirs(tmp_path) == []


def test_shard_sizes_save_pretrained_accepts_pass():
    from lora_dpo.merge import check_shard_size

    for size in ("5GB", "1.5GB", " 500MB ", "100kb", "1TB", 1_000_000):
        check_shard_size(size)


def interrupted_copy(run, destination):
    """``run`` as a killed run leaves it: config.yaml and checkpoints, no adapter or tokenizer at the top."""
    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("adapter_*", "tokenizer*", "chat_template.jinja",
                                                                     "summary.json", "README.md"))
    # checkpoint-10 is the newest complete one (numerically, not by name); checkpoint-12 was cut off
    # before its trainer_state.json was written.
    shutil.copytree(destination / "checkpoint-2", destination / "checkpoint-10")
    shutil.copytree(destination / "checkpoint-2", destination / "checkpoint-12")
    (destination / "checkpoint-12" / "trainer_state.json").unlink()
    return destination


def test_interrupted_run_names_its_newest_complete_checkpoint(run16, tmp_path, capsys):
    run = interrupted_copy(run16, tmp_path / "run")
    assert not (run / "adapter_config.json").exists() and (run / "config.yaml").is_file()
    for command in (["merge", str(run), "--out", str(tmp_path / "merged")], ["generate", str(run), "--prompt", "Hi"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{run}: the run did not finish" in err and f"Fix: use {run / 'checkpoint-10'}, the newest" in err
        assert "output.dir of a training run" not in err
    assert not (tmp_path / "merged").exists()

    for checkpoint in run.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    assert "the run did not finish and saved no complete checkpoint" in capsys.readouterr().err


def test_tokenizer_that_does_not_load_is_one_line_naming_the_flag(run16, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run16 / name, bare / name)
    empty_base = tmp_path / "empty-base"
    empty_base.mkdir()
    # --dtype float32: nothing reads the base's config.json before the tokenizer is loaded.
    assert main(["merge", str(bare), "--out", str(tmp_path / "merged"), "--base", str(empty_base),
                 "--dtype", "float32", "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # transformers' own error here spans five lines
    assert f"{empty_base}: cannot load the tokenizer from this directory (Couldn't instantiate" in err
    assert err.endswith("Fix: pass --base with the local directory or hub id of the model the adapter was trained on")
    assert "model.name_or_path" not in err  # a config key, not a flag of this command


def test_multi_line_messages_from_other_modules_print_as_one_line(run16, tmp_path, monkeypatch, capsys):
    from lora_dpo import merge
    from lora_dpo.errors import DataError

    def unreadable(*args, **kwargs):
        raise DataError("pairs.parquet: cannot read parquet (first line\n  second line\n). Fix: check the file")

    monkeypatch.setattr(merge, "verification_pairs", unreadable)
    assert main(["merge", str(run16), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err == "lora-dpo: error: pairs.parquet: cannot read parquet (first line second line ). Fix: check the file\n"
