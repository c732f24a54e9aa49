"""``lora-dpo sweep``: several training runs of one config in one process, sharing what does not change.

    lora-dpo sweep config.yaml dpo.beta=0.05,0.1,0.3 train.learning_rate=5e-6,2e-5 [key=value ...]
    lora-dpo sweep config.yaml train.learning_rate=1e-6:1e-4:log dpo.beta=0.05:0.5 --search optuna --trials 20

A comma list is a grid axis (every combination is a trial, the first key varying slowest); any
config key can be one, ``dpo.loss`` included. With ``--search optuna`` a range ``lo:hi[:log]`` is
searched by Optuna's TPE sampler and a comma list is a set of choices; a trial whose held-out
metric at an evaluation step is worse than the median of earlier trials at that step is pruned.

What the trials share, and why it is safe: the preference data is read and tokenized once, and
the base is loaded once (again only when a swept key changes how it loads: ``model.*``,
``lora.*``, or what the data decides); every trial gets fresh adapter weights from its seed
(``train.fresh_adapter``), so it starts exactly where a lone ``lora-dpo train`` of its settings
starts. The reference log-probs depend on neither beta nor the learning rate, so the sweep turns
``dpo.precompute_reference`` on (unless the config or an override sets it): the first trial
computes them into the reference cache (``reference_cache``) and every later trial reads them.

Each trial is a normal run in ``output.dir/trial-NNN/`` (its config.yaml, metrics, adapter) with
``train.resume=auto``: a sweep stopped at any moment continues with the same command; finished
trials are skipped, the interrupted one resumes from its checkpoint. After each trial
``sweep.md`` and ``sweep.csv`` are rewritten; at the end ``sweep.png`` plots the selection metric
against each swept key, and ``sweep.md`` names the best trial with the commands to use it.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import importlib.util
import io
import itertools
import json
import logging
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import Config, load_config, parse_override
from .errors import ConfigError, Interrupted, LoraDpoError
from .records import write_text_atomic

log = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"  # the sweep's axes: a rerun must name the same ones to continue
TABLE_MD, TABLE_CSV, PLOT = "sweep.md", "sweep.csv", "sweep.png"
JOURNAL = "optuna-journal.log"  # the Optuna study (a journal file: no database needed)
TRIAL_PREFIX = "trial-"
EVAL_JSON = Path("eval") / "eval.json"  # written into a run directory by the eval command

# --metric: (what it reads, higher is better, how the table names it). Held-out preference
# accuracy and margins are weak proxies for answer quality (docs/sweep.md says why); a judge's
# win rate measures it.
METRICS: dict[str, tuple[str, bool, str]] = {
    "win_rate": ("win_rate", True, "judge's win rate against the reference"),
    "loss": ("loss", False, "held-out loss"),
    "margin": ("rewards/margins", True, "held-out reward margin"),
    "accuracy": ("rewards/accuracy", True, "held-out preference accuracy"),
}
# Keys the sweep itself sets for every trial.
SWEEP_OWNED = {"output.dir": "the sweep's directory; each trial writes into output.dir/trial-NNN",
               "train.resume": "the sweep resumes on its own (train.resume=auto in every trial)"}
# Data settings that only decide how pairs are batched, not the tokenized pairs.
BATCHING_ONLY = ("layout", "pack_length", "group_by_length")
_RANGE = re.compile(r"^\s*([^:,]+):([^:,]+)(?::(log))?\s*$")


@dataclass
class Axis:
    """One swept key: grid values (or Optuna choices) as written, or an Optuna range."""

    key: str
    values: list[str] = field(default_factory=list)
    """The values as written on the command line, each a YAML scalar as an override takes it."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def describe(self) -> str:
        if self.is_range:
            return f"{self.key}={_text(self.low)}:{_text(self.high)}{':log' if self.log else ''}"
        return f"{self.key}={','.join(self.values)}"


@dataclass
class Sweep:
    """A checked sweep: where it writes, how it searches, and what every trial's config is built from."""

    config_path: str | None
    base_overrides: list[str]
    """The sweep's defaults, then the fixed key=value overrides, applied to every trial."""
    axes: list[Axis]
    search: str
    trials: int
    metric: str
    out: Path
    seed: int
    command: str
    """The command line that runs (and continues) this sweep."""
    fixed: list[str] = field(default_factory=list)
    """The user's fixed overrides, as given."""

    def trial_config(self, name: str, settings: dict[str, str]) -> Config:
        return load_config(self.config_path, [*self.base_overrides, *(f"{k}={v}" for k, v in settings.items()),
                                              f"output.dir={self.out / name}", "train.resume=auto"])

    def state(self) -> dict[str, Any]:
        state = {"search": self.search, "axes": [axis.describe() for axis in self.axes], "fixed": self.fixed}
        if self.search == "optuna":
            state["metric"] = self.metric  # the study's direction follows it
        return state


# ---------------------------------------------------------------------------------------------
# Reading the command line and checking every trial before anything loads


def split_values(text: str) -> list[str]:
    """``0.05,0.1`` -> ["0.05", "0.1"]; commas inside [...] or {...} belong to a YAML list or mapping."""
    pieces, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            pieces.append(current.strip())
            current = ""
        else:
            current += char
    pieces.append(current.strip())
    return pieces


def parse_axes(overrides: list[str], search: str) -> tuple[list[str], list[Axis]]:
    """Split the command line's key=value words into fixed overrides and swept axes."""
    fixed: list[str] = []
    axes: list[Axis] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep argument {item!r} is not key=value, key=a,b,c or key=lo:hi[:log]")
        values = split_values(text)
        ranged = _RANGE.match(text) if len(values) == 1 else None
        if key in SWEEP_OWNED and (len(values) > 1 or ranged or key == "train.resume"):
            raise ConfigError(f"sweep: {key} cannot be set or swept here: it is {SWEEP_OWNED[key]}", key=key)
        if any(axis.key == key for axis in axes) or (len(values) > 1 or ranged) and any(
                o.split("=", 1)[0].strip() == key for o in fixed):
            raise ConfigError(f"sweep: {key} is given twice. Fix: give it once", key=key)
        if len(values) > 1:
            if any(not value for value in values):
                raise ConfigError(f"sweep value {key}={text}: an empty value in the list", key=key)
            if len(set(values)) < len(values):
                raise ConfigError(f"sweep value {key}={text}: a value is listed twice", key=key)
            axes.append(Axis(key, values))
        elif ranged and _is_number(ranged[1]) and _is_number(ranged[2]):
            if search != "optuna":
                raise ConfigError(f"sweep value {key}={text}: a range needs --search optuna (a grid takes comma "
                                  "lists, e.g. 1e-5,3e-5,1e-4)", key=key)
            low, high = float(ranged[1]), float(ranged[2])
            integer = _is_int_field(key) and float(low).is_integer() and float(high).is_integer()
            if not low < high:
                raise ConfigError(f"sweep value {key}={text}: the low end must be below the high end", key=key)
            if ranged[3] and low <= 0:
                raise ConfigError(f"sweep value {key}={text}: a log range needs a positive low end", key=key)
            axes.append(Axis(key, low=low, high=high, log=bool(ranged[3]), integer=integer))
        else:
            fixed.append(item)
    return fixed, axes


def plan_sweep(config_path: str | None, overrides: list[str], search: str = "grid", trials: int | None = None,
               metric: str | None = None, command: str = "") -> Sweep:
    """The checked sweep: every value of every axis, and every grid trial, is built into a Config
    (``config.load_config``, with its one-line errors), so a bad value fails here, before any
    model or data loads, naming the key and the value."""
    fixed, axes = parse_axes(overrides, search)
    if not axes:
        raise ConfigError("sweep: nothing to sweep. Fix: give a key several values, e.g. dpo.beta=0.05,0.1,0.3"
                          + (", or a range, e.g. train.learning_rate=1e-6:1e-4:log" if search == "optuna" else ""))
    if search == "grid" and trials is not None:
        raise ConfigError("sweep: --trials is for --search optuna; a grid runs every combination of its lists")
    if trials is not None and trials < 1:
        raise ConfigError(f"sweep: --trials must be at least 1 (got {trials})")
    base = load_config(config_path, fixed)  # the fixed settings alone, checked first
    defaults = []
    if "dpo.precompute_reference" not in _keys_set(config_path, fixed):
        defaults.append("dpo.precompute_reference=true")
    metric = metric or ("win_rate" if _has_judge(base) else "loss")
    sweep = Sweep(config_path, [*defaults, *fixed], axes, search, trials or 20, metric,
                  Path(base.output.dir), base.train.seed, command, fixed)
    for axis in axes:  # each value on its own first: the error names that value
        for value in axis.values or [_text(axis.low), _text(axis.high)]:
            try:
                load_config(config_path, [*sweep.base_overrides, f"{axis.key}={value}"])
            except ConfigError as exc:
                raise ConfigError(f"sweep value {axis.key}={value}: {exc}", key=axis.key) from None
    if search == "grid":
        for index, settings in enumerate(grid_settings(axes)):
            try:
                config = sweep.trial_config(trial_name(index), settings)
            except ConfigError as exc:
                raise ConfigError(f"sweep trial {_settings_text(settings)}: {exc}", key=exc.key) from None
            _check_held_out(config, sweep.metric, settings)
    else:
        _check_held_out(base, sweep.metric, {})
    return sweep


def grid_settings(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    return [dict(zip((axis.key for axis in axes), combination))
            for combination in itertools.product(*(axis.values for axis in axes))]


def trial_name(index: int) -> str:
    return f"{TRIAL_PREFIX}{index:03d}"


def _check_held_out(config: Config, metric: str, settings: dict[str, str]) -> None:
    if metric != "win_rate" and not config.data.eval_file and config.data.eval_fraction == 0:
        where = f" (trial {_settings_text(settings)})" if settings else ""
        raise ConfigError(f"sweep: --metric {metric} is measured on held-out pairs, and there are none{where}. "
                          "Fix: set data.eval_file, or data.eval_fraction above 0", key="data.eval_fraction")


def _keys_set(config_path: str | None, overrides: list[str]) -> set[str]:
    """Dotted keys the YAML file or the overrides set explicitly."""
    keys = {parse_override(item)[0] for item in overrides}
    if config_path is not None:
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        keys |= {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}
    return keys


def _has_judge(config: Config) -> bool:
    """Whether the run evaluates with a judge (an ``eval`` section naming one), so a win rate exists."""
    return bool(getattr(getattr(config, "eval", None), "judge", None))


def _is_int_field(key: str) -> bool:
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or not dataclasses.is_dataclass(hints[section]):
        return False
    hint = typing.get_type_hints(hints[section]).get(name)
    return hint is int or int in typing.get_args(hint)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _text(value: Any) -> str:
    """A value as an override writes it: integers plainly, floats exactly (repr)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in settings.items())


# ---------------------------------------------------------------------------------------------
# What the trials share


class SharedPieces:
    """The tokenized data and the loaded base with its adapter, kept while consecutive trials
    agree on what decides them: the data settings (all but how pairs are batched), the seed (the
    held-out split) and the tokenizer for the data; the model.* and lora.* settings for the model.
    ``loads`` counts the base loads, ``data_reads`` the data reads."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.data: Any = None
        self._model_key: str | None = None
        self._data_key: str | None = None
        self.loads = 0
        self.data_reads = 0

    def for_trial(self, config: Config) -> dict[str, Any]:
        """``train``'s model, tokenizer and data for this trial's config."""
        from .data import load_preference_data
        from .modeling import load_model, load_tokenizer, resolve_device

        data_settings = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in BATCHING_ONLY}
        data_key = json.dumps([data_settings, config.train.seed, config.model.name_or_path, config.model.revision,
                               config.model.trust_remote_code], sort_keys=True, default=str)
        if data_key != self._data_key:
            self.tokenizer = load_tokenizer(config.model)
            self.data = load_preference_data(config.data, self.tokenizer, config.train.seed)
            for report in self.data.reports:
                log.info("data %s", report.summary())
            self._data_key, self.data_reads = data_key, self.data_reads + 1
        model_key = json.dumps([dataclasses.asdict(config.model), dataclasses.asdict(config.lora)],
                               sort_keys=True, default=str)
        if model_key != self._model_key:
            if self.model is not None:
                log.info("the model.* or lora.* settings changed: loading the base again")
                self._release_model()
            self.model = load_model(config, resolve_device(config.model.device))
            self._model_key, self.loads = model_key, self.loads + 1
        return {"model": self.model, "tokenizer": self.tokenizer, "data": self.data}

    def _release_model(self) -> None:
        import torch

        self.model, self._model_key = None, None
        gc.collect()  # the old base must be gone before the next one takes its memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Running the trials


def run_sweep(sweep: Sweep, overwrite: bool = False, progress: bool | None = None,
              pieces: SharedPieces | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the sweep; returns the table's rows, in trial order."""
    _open_sweep_dir(sweep, overwrite)
    if "dpo.precompute_reference=true" in sweep.base_overrides[:1]:
        log.info("sweep: dpo.precompute_reference is on: the reference log-probs depend on neither beta nor the "
                 "learning rate, so the first trial computes them once into dpo.reference_cache_dir and every "
                 "other trial reads them from there (set dpo.precompute_reference=false to compute them at "
                 "every step instead)")
    if sweep.metric in ("loss", "margin") and any(axis.key in ("dpo.beta", "dpo.loss") for axis in sweep.axes):
        log.warning("sweep: the held-out %s changes with dpo.beta and dpo.loss by construction, so it ranks trials "
                    "of different beta or loss unfairly; a judge's win rate (--metric win_rate) does not",
                    sweep.metric)
    pieces = pieces or SharedPieces()
    run = _run_optuna if sweep.search == "optuna" else _run_grid
    try:
        rows = run(sweep, pieces, overwrite, progress)
    except Interrupted as exc:
        raise Interrupted(f"{exc.args[0].split('. Resume with', 1)[0]}. Continue the sweep with the same command: "
                          f"{sweep.command}", exit_code=exc.exit_code) from None
    write_tables(sweep, rows, final=True)
    return rows


def _open_sweep_dir(sweep: Sweep, overwrite: bool) -> None:
    out = sweep.out
    state_path = out / SWEEP_STATE
    if out.exists() and not out.is_dir():
        raise LoraDpoError(f"output.dir {out} is a file. Fix: choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not state_path.is_file():
        first = sorted(entry.name for entry in out.iterdir())[0]
        raise LoraDpoError(f"output.dir {out} holds files that lora-dpo sweep did not write (such as {first}). "
                           "Fix: choose another output.dir for the sweep")
    if state_path.is_file() and not overwrite:
        before = json.loads(state_path.read_text(encoding="utf-8"))
        if before != sweep.state():
            raise LoraDpoError(f"output.dir {out} holds another sweep ({', '.join(before['axes'])}; search "
                               f"{before['search']}). Fix: repeat that sweep's command to continue it, choose "
                               "another output.dir, or pass --overwrite to replace it")
    if overwrite:
        (out / JOURNAL).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_path, json.dumps(sweep.state(), indent=2) + "\n")


def _run_trial(sweep: Sweep, name: str, settings: dict[str, str], pieces: SharedPieces, overwrite: bool,
               progress: bool | None, on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> str | None:
    """Run one trial (nothing when it already finished); returns why it failed, or None.

    A trial's own failure (a learning rate that diverges, a micro-batch that does not fit) is
    the trial's result, and the sweep goes on; what every trial needs (the data, the base) fails
    the sweep, as does a stop request."""
    from .train import finished_run, train

    config = sweep.trial_config(name, settings)
    if finished_run(config, overwrite) is not None:
        log.info("%s (%s) already finished: skipped", name, _settings_text(settings))
        return None
    log.info("== %s: %s", name, _settings_text(settings))
    shared = pieces.for_trial(config)
    try:
        train(config, overwrite, progress, on_evaluation=on_evaluation, **shared)
    except Interrupted:
        raise
    except LoraDpoError as exc:
        log.warning("%s failed: %s", name, exc)
        return str(exc)
    return None


def _run_grid(sweep: Sweep, pieces: SharedPieces, overwrite: bool, progress: bool | None) -> list[dict[str, Any]]:
    rows = []
    for index, settings in enumerate(grid_settings(sweep.axes)):
        name = trial_name(index)
        failure = _run_trial(sweep, name, settings, pieces, overwrite, progress)
        rows.append(trial_row(sweep, name, settings, "failed" if failure else "finished", failure))
        write_tables(sweep, rows)
    return rows


def _run_optuna(sweep: Sweep, pieces: SharedPieces, overwrite: bool, progress: bool | None) -> list[dict[str, Any]]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, higher, _ = METRICS[sweep.metric]
    # Pruning compares a trial's held-out metric at an evaluation step with the median of the
    # earlier trials' at that step; the first two trials always run to the end.
    study = optuna.create_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(str(sweep.out / JOURNAL))),
                                load_if_exists=True, direction="maximize" if higher else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=sweep.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    # A trial left running by a stopped sweep is asked again with its own parameters and
    # directory, so it resumes from its checkpoint.
    for left in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(left.number, state=TrialState.FAIL)
        study.enqueue_trial(left.params, user_attrs={"dir": left.user_attrs["dir"]})
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    while len(study.get_trials(deepcopy=False, states=done)) < sweep.trials:
        trial = study.ask()
        used = [int(t.user_attrs["dir"].removeprefix(TRIAL_PREFIX)) for t in study.get_trials(deepcopy=False)
                if "dir" in t.user_attrs]
        name = trial.user_attrs.get("dir") or trial_name(max(used, default=-1) + 1)
        trial.set_user_attr("dir", name)
        settings = {}
        for axis in sweep.axes:
            if not axis.is_range:
                settings[axis.key] = trial.suggest_categorical(axis.key, axis.values)
            elif axis.integer:
                settings[axis.key] = _text(trial.suggest_int(axis.key, int(axis.low), int(axis.high), log=axis.log))
            else:
                settings[axis.key] = _text(trial.suggest_float(axis.key, axis.low, axis.high, log=axis.log))
        trial.set_user_attr("settings", settings)

        def prune(row: dict[str, Any], trial: Any = trial) -> None:
            value = row.get(METRICS[sweep.metric][0])
            if value is None:  # a win rate exists only at the end
                return
            trial.report(value, row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"held-out {sweep.metric} {value:.4g} at step {row['step']}")

        try:
            failure = _run_trial(sweep, name, settings, pieces, overwrite, progress, prune)
        except optuna.TrialPruned as exc:
            log.info("%s pruned: %s is below the median of the earlier trials", name, exc)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            if failure:
                trial.set_user_attr("error", failure)
                study.tell(trial, state=TrialState.FAIL)
                write_tables(sweep, _optuna_rows(sweep, study))
                continue
            value = metric_value(sweep.metric, read_trial(sweep.out / name))
            if value is None:
                log.warning("%s has no %s (%s missing): Optuna counts it as failed", name, sweep.metric, EVAL_JSON)
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
        write_tables(sweep, _optuna_rows(sweep, study))
    return _optuna_rows(sweep, study)


def _optuna_rows(sweep: Sweep, study: Any) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    latest: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        if "settings" in trial.user_attrs and trial.state != TrialState.RUNNING:
            latest[trial.user_attrs["dir"]] = trial  # a resumed trial replaces its stopped attempt
    status = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    return [trial_row(sweep, name, trial.user_attrs["settings"], status.get(trial.state, trial.state.name.lower()),
                      trial.user_attrs.get("error"))
            for name, trial in sorted(latest.items())]


# ---------------------------------------------------------------------------------------------
# Results: one row per trial, the table, the plot


def read_trial(run_dir: Path) -> dict[str, Any]:
    """What a trial's directory says about it: summary.json when it finished (else the last
    held-out row of metrics.jsonl, as for a pruned trial) and eval/eval.json when present."""
    from .train import SUMMARY_FILE

    found: dict[str, Any] = {"final_eval": None, "final_train": None, "steps": None, "seconds": None}
    if (run_dir / SUMMARY_FILE).is_file():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        found.update({key: summary.get(key) for key in found})
    elif (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            found["final_eval" if row.get("split") == "eval" else "final_train"] = row
            found["steps"] = row.get("step")
    judged = run_dir / EVAL_JSON
    evaluation = json.loads(judged.read_text(encoding="utf-8")) if judged.is_file() else {}
    win = evaluation.get("win_rate")
    found["win_rate"] = win.get("win_rate") if isinstance(win, dict) else None
    found["kl"] = evaluation.get("kl")
    found["length_ratio"] = evaluation.get("length_ratio")
    return found


def metric_value(metric: str, found: dict[str, Any]) -> float | None:
    name = METRICS[metric][0]
    if metric == "win_rate":
        return found["win_rate"]
    return (found["final_eval"] or {}).get(name)


COLUMNS = ("eval_loss", "eval_margin", "eval_accuracy", "win_rate", "kl", "length_ratio", "train_loss", "steps",
           "seconds")


def trial_row(sweep: Sweep, name: str, settings: dict[str, str], status: str,
              error: str | None = None) -> dict[str, Any]:
    found = read_trial(sweep.out / name)
    held_out, train = found["final_eval"] or {}, found["final_train"] or {}
    return {"trial": name, "status": status, **settings, "metric": metric_value(sweep.metric, found),
            "eval_loss": held_out.get("loss"), "eval_margin": held_out.get("rewards/margins"),
            "eval_accuracy": held_out.get("rewards/accuracy"), "win_rate": found["win_rate"], "kl": found["kl"],
            "length_ratio": found["length_ratio"], "train_loss": train.get("loss"), "steps": found["steps"],
            "seconds": found["seconds"], "error": error}


def best_row(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the best metric (the first of equals), None when none has one."""
    _, higher, _ = METRICS[sweep.metric]
    scored = [row for row in rows if row["metric"] is not None and row["status"] == "finished"]
    if not scored:
        return None
    return max(scored, key=lambda row: row["metric"]) if higher else min(scored, key=lambda row: row["metric"])


def write_tables(sweep: Sweep, rows: list[dict[str, Any]], final: bool = False) -> None:
    """sweep.csv (one row per trial) and sweep.md (the table, the best trial and how to use it);
    with ``final``, also the plot. Each file is replaced atomically."""
    keys = [axis.key for axis in sweep.axes]
    header = ["trial", "status", *keys, f"metric ({sweep.metric})", *COLUMNS, "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row[k]
                         for k in ["trial", "status", *keys, "metric", *COLUMNS, "error"]])
    write_text_atomic(sweep.out / TABLE_CSV, buffer.getvalue())
    plotted = final and _write_plot(sweep, rows)
    write_text_atomic(sweep.out / TABLE_MD, sweep_markdown(sweep, rows, plotted))


def sweep_markdown(sweep: Sweep, rows: list[dict[str, Any]], plotted: bool = False) -> str:
    _, higher, label = METRICS[sweep.metric]
    keys = [axis.key for axis in sweep.axes]
    best = best_row(sweep, rows)
    lines = [f"# Sweep: {', '.join(axis.describe() for axis in sweep.axes)}", "",
             f"`{sweep.command}`", "",
             f"Selection metric: {label} ({'higher' if higher else 'lower'} is better). "
             + ("A judge's win rate measures answer quality; held-out loss, margin and preference accuracy are "
                "proxies for it, and loss and margin change with dpo.beta and dpo.loss by construction "
                "(docs/sweep.md)." if sweep.metric != "win_rate" else "KL and length ratio are the eval's."), "",
             "| " + " | ".join(["trial", "status", *keys, sweep.metric, *COLUMNS]) + " |",
             "|" + "---|" * (3 + len(keys) + len(COLUMNS))]
    for row in rows:
        cells = [f"**{row['trial']}**" if row is best else row["trial"], row["status"], *(row[k] for k in keys),
                 _cell(row["metric"]), *(_cell(row[c]) for c in COLUMNS)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for row in rows:
        if row.get("error"):
            lines += [f"{row['trial']} failed: {row['error']}", ""]
    if best is None:
        lines.append(f"No finished trial has a {sweep.metric} yet."
                     + (f" A win rate comes from each trial's {EVAL_JSON.as_posix()} (lora-dpo eval)."
                        if sweep.metric == "win_rate" else ""))
    else:
        run_dir = sweep.out / best["trial"]
        settings = {k: best[k] for k in keys}
        fixed = [o for o in sweep.fixed if o.split("=", 1)[0].strip() != "output.dir"]
        retrain = " ".join(["lora-dpo train", sweep.config_path or "", *fixed,
                            *(f"{k}={v}" for k, v in settings.items()), "output.dir=runs/best"]).replace("  ", " ")
        lines += [f"Best: **{best['trial']}** ({_settings_text(settings)}), {sweep.metric} {_cell(best['metric'])}.", "",
                  "Use it:", "", "```bash",
                  f"lora-dpo generate {run_dir} --compare --prompt \"...\"   # its answers beside the base's",
                  f"lora-dpo merge {run_dir} --out {run_dir}-merged         # a standalone model",
                  f"{retrain}   # the same run again, on its own", "```"]
    if plotted:
        lines += ["", f"![{sweep.metric} against each swept key]({PLOT})"]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_plot(sweep: Sweep, rows: list[dict[str, Any]]) -> bool:
    """sweep.png: the metric against each swept key, one panel per key; False when nothing to plot."""
    scored = [row for row in rows if row["metric"] is not None]
    if not scored:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("sweep: no plot (matplotlib is not installed: pip install 'lora-dpo[plots]')")
        return False
    _, higher, label = METRICS[sweep.metric]
    figure, panels = plt.subplots(1, len(sweep.axes), figsize=(4.2 * len(sweep.axes), 3.4), squeeze=False)
    for panel, axis in zip(panels[0], sweep.axes):
        texts = [row[axis.key] for row in scored]
        numbers = [_number(text) for text in texts]
        if all(n is not None for n in numbers):
            panel.scatter(numbers, [row["metric"] for row in scored])
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
                panel.set_xscale("log")
        else:
            order = list(dict.fromkeys(axis.values or texts))
            panel.scatter([order.index(t) for t in texts], [row["metric"] for row in scored])
            panel.set_xticks(range(len(order)), order, rotation=20)
        panel.set_xlabel(axis.key)
        panel.set_ylabel(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=8)
        panel.grid(alpha=0.3)
    figure.tight_layout()
    partial = sweep.out / f".tmp-{PLOT}"
    figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)
    partial.replace(sweep.out / PLOT)
    return True


def _number(text: Any) -> float | None:
    value = yaml.safe_load(str(text))
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The command


def run_sweep_command(args: Any) -> int:
    """``lora-dpo sweep``: check everything, run (or continue) the trials, print the table's path and the best trial."""
    words = ["lora-dpo sweep", *([args.config] if args.config else []), *args.overrides]
    if args.search != "grid":
        words += ["--search", args.search]
    if args.trials is not None:
        words += ["--trials", str(args.trials)]
    if args.metric:
        words += ["--metric", args.metric]
    sweep = plan_sweep(args.config, args.overrides, args.search, args.trials, args.metric, " ".join(words))
    if args.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise LoraDpoError("--search optuna needs Optuna. Fix: pip install 'lora-dpo[sweep]', or sweep a grid of "
                           "comma lists")
    rows = run_sweep(sweep, overwrite=args.overwrite, progress=False if args.no_progress else None)
    best = best_row(sweep, rows)
    print(f"{len(rows)} trials in {sweep.out}: table in {sweep.out / TABLE_MD} and {sweep.out / TABLE_CSV}")
    if best is None:
        print(f"no finished trial has a {sweep.metric} yet")
    else:
        settings = {axis.key: best[axis.key] for axis in sweep.axes}
        print(f"best: {best['trial']} ({_settings_text(settings)}), {sweep.metric} {_cell(best['metric'])}; "
              f"adapter in {sweep.out / best['trial']}")
    return 0
