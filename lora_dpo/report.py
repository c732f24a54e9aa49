"""The report of a training run: report.md and a self-contained report.html, with plots.

``write_report(run_dir)`` reads what a run leaves in its output.dir and writes, beside it::

    plots/*.png      the metrics over steps and the data's length histograms (lora_dpo.plots)
    report.md        the same content as Markdown, the plots linked
    report.html      one file, the plots embedded as base64: it opens offline, and can be mailed

from ``config.yaml`` (the resolved config), ``metrics.jsonl`` (train and held-out rows),
``summary.json`` (absent while a run is unfinished or after it was interrupted: the report says
so and shows what there is), ``data_audit.json``, ``samples.jsonl`` (train.sample_every) and,
when ``lora-dpo eval`` has run, ``eval/eval.json`` and ``eval/samples.jsonl``. Warnings in plain
words come first (``run_warnings``). Every training run writes its report at the end;
``lora-dpo report RUN_DIR`` rebuilds it at any time. Never imports torch or loads a model.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoraDpoError
from .records import write_text_atomic

REPORT_FILES = ("report.md", "report.html", "plots")
"""What write_report puts in a run directory."""
SAMPLES_FILE = "samples.jsonl"
AUDIT_FILE = "data_audit.json"
EVAL_FILE = Path("eval") / "eval.json"
EVAL_SAMPLES_FILE = Path("eval") / "samples.jsonl"

EARLY_SHARE = 0.1
"""Held-out accuracy of 1.0 within this share of the steps is warned about."""
LONGER_RATIO = 1.5
"""Policy answers longer than this many times the reference's are warned about."""
KL_NATS = 50.0
"""KL to the reference above this (nats per answer) is warned about: well-behaved DPO runs stay at a few tens."""

# Metrics shown in the final table, in order, with their names in words.
SHOWN_METRICS = [("loss", "loss"), ("rewards/accuracy", "reward accuracy"), ("rewards/margins", "reward margin"),
                 ("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"),
                 ("logps/chosen", "chosen log-prob"), ("logps/rejected", "rejected log-prob")]
SHOWN_PROMPTS = 6
SHOWN_STEPS = 8


@dataclass
class RunFiles:
    """What a run directory holds, read; every part but the directory and the rows may be missing."""

    run_dir: Path
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    eval_samples: list[dict[str, Any]] = field(default_factory=list)
    torn_lines: int = 0
    """Lines of the JSONL files that are not JSON (a run killed mid-write leaves one)."""

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("split") == "train"]

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("split") == "eval"]

    @property
    def total_steps(self) -> int | None:
        """The steps the run was to take: the summary's, else train.max_steps; None when unknown
        (an unfinished run counted in epochs)."""
        if self.summary:
            return int(self.summary["steps"])
        return (self.config.get("train") or {}).get("max_steps")


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of a run directory; a directory without metrics.jsonl is not a run (one-line error)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        what = "does not exist" if not run_dir.exists() else "holds no metrics.jsonl"
        raise LoraDpoError(f"{run_dir} {what}, so it is not a training run's output. Fix: give the output.dir "
                           "of a run (lora-dpo train writes metrics.jsonl there at its start)")
    run = RunFiles(run_dir)
    run.rows = _read_jsonl(metrics, run)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        run.config_text = config_path.read_text(encoding="utf-8")
        run.config = yaml.safe_load(run.config_text) or {}
    run.summary = _read_json(run_dir / "summary.json")
    run.audit = _read_json(run_dir / AUDIT_FILE)
    run.evaluation = _read_json(run_dir / EVAL_FILE)
    if (run_dir / SAMPLES_FILE).is_file():
        run.samples = _read_jsonl(run_dir / SAMPLES_FILE, run)
    if (run_dir / EVAL_SAMPLES_FILE).is_file():
        run.eval_samples = _read_jsonl(run_dir / EVAL_SAMPLES_FILE, run)
    return run


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraDpoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}). Fix: restore or delete the file, "
                           "then run lora-dpo report again") from None


def _read_jsonl(path: Path, run: RunFiles) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            run.torn_lines += 1
    return rows


# ---------------------------------------------------------------------------------------------
# Warnings


def run_warnings(run: RunFiles) -> list[str]:
    """What users get wrong, in plain words: each a sentence saying what was seen, what it means
    and what to try. The evaluation's own warnings (eval.json) follow, without repeats."""
    found = []
    total = run.total_steps
    if total:
        early = [row for row in run.eval_rows if row["step"] <= EARLY_SHARE * total
                 and row.get("rewards/accuracy", 0) >= 1.0]
        if early:
            found.append(f"Held-out reward accuracy reached 1.0 at step {early[0]['step']} of {total}, within the first "
                         "tenth of training. Pairs this easy to tell apart usually differ by something shallow (length, "
                         "a fixed phrase, formatting) that the model learns instead of the preference; look at the data "
                         "audit and the samples, and make the pairs harder before trusting the run.")
    falling = _chosen_logp_change(run)
    if falling is not None:
        start, end, where = falling
        found.append(f"The chosen answers' log-probability fell from {start:.1f} to {end:.1f} nats ({where}): the model "
                     "makes even the preferred answers less likely and wins its margin by pushing the rejected ones "
                     "down faster (\"likelihood displacement\"); probability moves to answers in neither set. Lower "
                     "train.learning_rate or raise dpo.beta, or add the chosen answers' NLL (dpo.loss=rpo).")
    ratio, where = _length_ratio(run)
    if ratio is not None and ratio > LONGER_RATIO:
        found.append(f"The policy's answers are {ratio:.2f}x as long as the reference's ({where}). DPO is known to "
                     "reward length itself when chosen answers tend to be longer; check whether the answers are better "
                     "or only longer (a length-controlled win rate helps), and balance the lengths in the data or "
                     "raise dpo.beta.")
    kl = _number(run.evaluation.get("kl")) if run.evaluation else None
    if kl is not None and kl > KL_NATS:
        found.append(f"The policy is {kl:.0f} nats per answer away from the reference (KL on its own samples); "
                     "well-behaved DPO runs stay within a few tens. The model has drifted far from where it started, "
                     "which often shows as odd or repetitive text: lower train.learning_rate, raise dpo.beta or "
                     "train fewer steps.")
    skipped = run.summary.get("skipped_steps", 0) if run.summary else sum(bool(r.get("skipped")) for r in run.train_rows)
    if skipped:
        found.append(f"{skipped} steps had their update skipped for a non-finite loss or gradient (under float16 the "
                     "first few are the loss scaler calibrating, which is routine). Many of them mean the learning "
                     "rate is too high or the data holds something the model cannot score; see docs/reliability.md.")
    if run.summary is None:
        last = run.train_rows[-1]["step"] if run.train_rows else 0
        of = f" of {total}" if total else ""
        found.append(f"The run has not finished (no summary.json): this report shows its first {last}{of} steps. "
                     "Resume it with lora-dpo train CONFIG --resume, or it stopped before its first checkpoint.")
    for warning in (run.evaluation or {}).get("warnings") or []:
        if warning not in found:
            found.append(str(warning))
    return found


def _chosen_logp_change(run: RunFiles) -> tuple[float, float, str] | None:
    """(start, end, where measured) when the chosen log-prob fell by more than a nat and 2%."""
    candidates = []
    for name, values in ((run.evaluation or {}).get("metrics") or {}).items():
        lowered = name.lower()
        if "chosen" in lowered and "logp" in lowered.replace("-", "").replace("_", ""):
            start, end = _number(values.get("reference")), _number(values.get("policy"))
            if start is not None and end is not None:
                candidates.append((start, end, "held-out pairs, reference vs policy, lora-dpo eval"))
                break
    evals = [row["logps/chosen"] for row in run.eval_rows if _number(row.get("logps/chosen")) is not None]
    if len(evals) >= 2:
        candidates.append((evals[0], evals[-1], "held-out pairs, first vs last evaluation"))
    train = [row["logps/chosen"] for row in run.train_rows if _number(row.get("logps/chosen")) is not None]
    if len(train) >= 10:
        tenth = max(1, len(train) // 10)
        candidates.append((sum(train[:tenth]) / tenth, sum(train[-tenth:]) / tenth,
                           "training pairs, first vs last tenth of the steps"))
    for start, end, where in candidates[:1]:
        if start - end > max(1.0, 0.02 * abs(start)):
            return start, end, where
    return None


def _length_ratio(run: RunFiles) -> tuple[float | None, str]:
    """Policy over reference answer length: lora-dpo eval's, else the periodic samples' last step
    over step 0 (before the first update the policy is the reference)."""
    if run.evaluation and _number(run.evaluation.get("length_ratio")) is not None:
        return _number(run.evaluation["length_ratio"]), "lora-dpo eval, same prompts and seeds"
    lengths: dict[int, list[int]] = {}
    for row in run.samples:
        lengths.setdefault(row["step"], []).append(row.get("tokens", len(str(row.get("answer", "")))))
    if 0 in lengths and len(lengths) > 1:
        last = max(lengths)
        before, after = sum(lengths[0]) / len(lengths[0]), sum(lengths[last]) / len(lengths[last])
        if before > 0:
            return after / before, f"periodic samples, step {last} vs step 0"
    return None, ""


def _number(value: Any) -> float | None:
    """A finite number, or a {"mean": number} summary; None otherwise."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# ---------------------------------------------------------------------------------------------
# Content, shared by both formats: a list of blocks


@dataclass
class Block:
    """One piece of the report: a heading, a paragraph, a list, a table, an image or code."""

    kind: str  # heading | text | bullets | table | image | code
    content: Any
    level: int = 2


def report_blocks(run: RunFiles, plots: dict[str, Path]) -> list[Block]:
    blocks = [Block("heading", f"Training report: {run.run_dir.name}", 1), Block("text", _status(run))]
    warnings = run_warnings(run)
    blocks.append(Block("heading", "Warnings"))
    blocks.append(Block("bullets", warnings) if warnings else Block("text", "None: nothing the checks look for happened."))
    blocks += _metrics_blocks(run)
    if run.evaluation:
        blocks += _evaluation_blocks(run.evaluation)
    blocks.append(Block("heading", "Plots"))
    if any(name != "lengths" for name in plots):
        blocks.append(Block("text", "Train curves are drawn faint as logged and solid smoothed; held-out evaluations "
                                    "are the dashed lines with open markers."))
    blocks += [Block("image", (name, path)) for name, path in plots.items() if name != "lengths"]
    blocks += _sample_blocks(run)
    blocks += _audit_blocks(run, plots.get("lengths"))
    blocks.append(Block("heading", "Configuration"))
    blocks.append(Block("code", run.config_text or "(config.yaml is missing)"))
    return blocks


def _status(run: RunFiles) -> str:
    summary = run.summary
    if summary:
        text = (f"Finished: {summary['steps']} steps on {summary.get('pairs_trained', 0)} pairs "
                f"({summary.get('epochs', 0):.3g} epochs of {summary['train_pairs']} training pairs; "
                f"{summary['eval_pairs']} held-out pairs) in {summary['seconds']:.0f} s.")
        if summary.get("rewards"):
            text += f" Rewards are {summary['rewards']}."
    else:
        last = run.train_rows[-1]["step"] if run.train_rows else 0
        text = f"Not finished: {last} steps logged so far."
    model = (run.config.get("model") or {}).get("name_or_path")
    dpo = run.config.get("dpo") or {}
    train = run.config.get("train") or {}
    if model:
        text += f" Base model {model}; loss {dpo.get('loss')}, beta {dpo.get('beta')}, learning rate {train.get('learning_rate')}."
    if run.torn_lines:
        text += f" {run.torn_lines} unreadable JSONL lines were left out (a run killed mid-write leaves one)."
    return text


def _metrics_blocks(run: RunFiles) -> list[Block]:
    train, evals = run.train_rows, run.eval_rows
    if not train and not evals:
        return [Block("heading", "Final metrics"), Block("text", "No metrics were logged yet.")]
    columns = []
    if train:
        columns.append((f"train, step {train[-1]['step']}", train[-1]))
    if len(evals) > 1:
        columns.append((f"held-out, step {evals[0]['step']}", evals[0]))
    if evals:
        columns.append((f"held-out, step {evals[-1]['step']}", evals[-1]))
    rows = [[label] + [_format(row.get(key)) for _, row in columns] for key, label in SHOWN_METRICS
            if any(key in row for _, row in columns)]
    blocks = [Block("heading", "Final metrics"), Block("table", (["metric"] + [name for name, _ in columns], rows))]
    if train:
        last = train[-1]
        speed = [f"{name} {_format(last.get(key))}" for key, name in
                 (("tokens_per_s", "tokens/s"), ("peak_memory_gib", "peak memory GiB"),
                  ("peak_reserved_gib", "peak reserved GiB"), ("lr", "learning rate")) if key in last]
        blocks.append(Block("text", "Last step: " + ", ".join(speed) + "."))
    return blocks


def _evaluation_blocks(evaluation: dict[str, Any]) -> list[Block]:
    blocks = [Block("heading", "Evaluation (lora-dpo eval)")]
    facts = [f"{label}: {evaluation[key]}" for key, label in
             (("data", "data"), ("pairs", "held-out pairs"), ("prompts", "prompts"),
              ("samples_per_prompt", "samples per prompt"), ("judge", "judge")) if evaluation.get(key) is not None]
    if facts:
        blocks.append(Block("text", "; ".join(facts) + "."))
    metrics = evaluation.get("metrics") or {}
    if metrics:
        rows = []
        for name, values in metrics.items():
            reference, policy = values.get("reference"), values.get("policy")
            change = (_format(policy - reference) if _number(reference) is not None and _number(policy) is not None
                      else "")
            rows.append([name, _format(reference), _format(policy), change])
        blocks.append(Block("table", (["metric", "reference", "policy", "change"], rows)))
    extra = []
    if evaluation.get("length_ratio") is not None:
        extra.append(f"answer length, policy / reference: {_format(evaluation['length_ratio'])}")
    if evaluation.get("kl") is not None:
        extra.append(f"KL to the reference on the policy's samples: {_format(evaluation['kl'])} nats per answer")
    win = evaluation.get("win_rate")
    if win:
        low, high = (win.get("ci95") or [None, None])[:2]
        text = (f"win rate of the policy over the reference: {_format(win.get('win_rate'))} "
                f"(95% CI {_format(low)} to {_format(high)}; {win.get('wins')} wins, {win.get('ties')} ties, "
                f"{win.get('losses')} losses, ties counting half)")
        if win.get("lc_win_rate") is not None:
            text += f"; length-controlled {_format(win['lc_win_rate'])}"
        extra.append(text)
    elif "win_rate" in evaluation:
        extra.append("win rate: not measured (no judge)")
    if extra:
        blocks.append(Block("bullets", extra))
    return blocks


def _sample_blocks(run: RunFiles) -> list[Block]:
    blocks: list[Block] = []
    if run.eval_samples:
        blocks.append(Block("heading", "Samples: reference and policy, side by side"))
        shown = [row for row in run.eval_samples if row.get("sample", 0) == 0][:SHOWN_PROMPTS]
        scored = any(row.get("policy_score") is not None for row in shown)
        header = ["prompt", "reference", "policy"] + (["judge scores (reference / policy)"] if scored else [])
        rows = [[_text(row.get("prompt")), row.get("reference", ""), row.get("policy", "")]
                + ([f"{_format(row.get('reference_score'))} / {_format(row.get('policy_score'))}"] if scored else [])
                for row in shown]
        blocks.append(Block("table", (header, rows)))
    if run.samples:
        blocks.append(Block("heading", "How answers changed during training"))
        steps = sorted({row["step"] for row in run.samples})
        if len(steps) > SHOWN_STEPS:  # the first, the last, and evenly spaced between
            steps = sorted({steps[round(i * (len(steps) - 1) / (SHOWN_STEPS - 1))] for i in range(SHOWN_STEPS)})
        by_prompt: dict[int, dict[int, dict[str, Any]]] = {}
        for row in run.samples:
            by_prompt.setdefault(row["prompt_index"], {})[row["step"]] = row
        blocks.append(Block("text", "Each prompt answered at the steps below with the same random numbers every time, "
                                    "so a change is the model's (step 0: before the first update, the reference)."))
        for index in sorted(by_prompt)[:SHOWN_PROMPTS]:
            answers = by_prompt[index]
            prompt = _text(next(iter(answers.values())).get("prompt"))
            blocks.append(Block("heading", f"Prompt {index}: {_shorten(prompt, 120)}", 3))
            blocks.append(Block("table", (["step", "answer"],
                                          [[str(step), answers[step]["answer"]] for step in steps if step in answers])))
    return blocks


def _audit_blocks(run: RunFiles, histogram: Path | None) -> list[Block]:
    blocks = [Block("heading", "Data audit")]
    if not run.audit:
        return blocks + [Block("text", "No data_audit.json (the run predates it).")]
    splits = run.audit.get("splits", [])
    labels = [("source", "source"), ("rows", "rows read"), ("skipped", "bad rows skipped"),
              ("implicit_prompts", "prompts split off the responses"), ("truncated_prompts", "prompts truncated"),
              ("truncated_responses", "responses truncated"), ("pairs", "pairs trained on / evaluated")]
    rows = [[label] + [str(split.get(key, "")) for split in splits] for key, label in labels]
    rows.insert(-1, ["chosen == rejected (skipped / dropped after truncation)"]
                + [f"{split['chosen_equals_rejected']['rows_skipped']} / "
                   f"{split['chosen_equals_rejected']['dropped_after_truncation']}" for split in splits])
    for part in ("prompt", "chosen", "rejected"):
        rows.append([f"{part} tokens (mean / median / max)"]
                    + [f"{split['lengths'][part]['mean']:.0f} / {split['lengths'][part]['median']} / "
                       f"{split['lengths'][part]['max']}" for split in splits])
    blocks.append(Block("table", (["", *[split["name"] for split in splits]], rows)))
    reasons = [f"{split['name']}: {count} x {reason}" for split in splits
               for reason, count in split.get("skipped_by_reason", {}).items()]
    if reasons:
        blocks.append(Block("text", "Skipped rows by reason:"))
        blocks.append(Block("bullets", reasons))
    if histogram is not None:
        blocks.append(Block("image", ("lengths", histogram)))
    return blocks


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict) and "mean" in value:
        return _format(value["mean"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4g}"


def _text(prompt: Any) -> str:
    """A prompt as text: chat messages as role: content lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Rendering


def render_markdown(blocks: list[Block], run_dir: Path) -> str:
    out = []
    for block in blocks:
        if block.kind == "heading":
            out.append(f"{'#' * block.level} {block.content}\n")
        elif block.kind == "text":
            out.append(f"{block.content}\n")
        elif block.kind == "bullets":
            out.append("\n".join(f"- {item}" for item in block.content) + "\n")
        elif block.kind == "table":
            header, rows = block.content
            out.append("| " + " | ".join(_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
            out.append("")
        elif block.kind == "image":
            name, path = block.content
            out.append(f"![{name}]({path.relative_to(run_dir).as_posix()})\n")
        elif block.kind == "code":
            fence = "````" if "```" in block.content else "```"
            out.append(f"{fence}yaml\n{block.content.rstrip()}\n{fence}\n")
    return "\n".join(out)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
td { white-space: pre-wrap; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5rem 0; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
ul.warnings li { color: #8a1c00; margin-bottom: 0.4rem; }
"""


def render_html(blocks: list[Block]) -> str:
    """One HTML file with the plots inlined as data: URLs and no external resource."""
    title = next((b.content for b in blocks if b.kind == "heading"), "report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]
    previous = None
    for block in blocks:
        if block.kind == "heading":
            out.append(f"<h{block.level}>{html.escape(block.content)}</h{block.level}>")
        elif block.kind == "text":
            out.append(f"<p>{html.escape(block.content)}</p>")
        elif block.kind == "bullets":
            css = ' class="warnings"' if previous is not None and previous.content == "Warnings" else ""
            out.append(f"<ul{css}>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in block.content) + "</ul>")
        elif block.kind == "table":
            header, rows = block.content
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            out.append("</table>")
        elif block.kind == "image":
            name, path = block.content
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif block.kind == "code":
            out.append(f"<pre>{html.escape(block.content)}</pre>")
        previous = block
    out.append("</body></html>")
    return "\n".join(out) + "\n"


@dataclass
class Report:
    markdown: Path
    html: Path
    plots: dict[str, Path]
    warnings: list[str]


def write_report(run_dir: str | Path) -> Report:
    """Plots, report.md and report.html for the run in ``run_dir``, from what it holds now."""
    from .plots import plot_lengths, plot_metrics

    run = read_run(run_dir)
    plot_dir = run.run_dir / "plots"
    plots = plot_metrics(run.rows, plot_dir)
    if run.audit:
        lengths = plot_lengths(run.audit.get("splits", []), plot_dir / "lengths.png")
        if lengths is not None:
            plots["lengths"] = lengths
    blocks = report_blocks(run, plots)
    markdown, page = run.run_dir / "report.md", run.run_dir / "report.html"
    for path, text in ((markdown, render_markdown(blocks, run.run_dir)), (page, render_html(blocks))):
        write_text_atomic(path, text)
    return Report(markdown, page, plots, run_warnings(run))
