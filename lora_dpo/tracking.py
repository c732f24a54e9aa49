"""Experiment tracking: every metrics row of a run, also sent to TensorBoard, W&B or trackio.

``output.report_to`` lists the back-ends (any of ``tensorboard``, ``wandb``, ``trackio``; empty:
none, and nothing here is imported). The loop calls three functions::

    check_trackers(config)                  # before the output directory is touched: a missing
                                            # package is a one-line error naming the key and the pip command
    tracker = open_trackers(config, out)    # after it is opened
    tracker.log(row)                        # train.record, for every metrics row
    tracker.close()                         # when the run ends, finished or not

Offline by default. TensorBoard writes event files to ``output.dir/tensorboard``. W&B runs in
offline mode (files under ``output.dir/wandb``, uploaded later with ``wandb sync``) unless
``WANDB_MODE`` says otherwise. trackio logs to its local database (``TRACKIO_DIR``, by default
under the Hugging Face cache) unless ``TRACKIO_SPACE_ID`` or ``TRACKIO_SERVER_URL`` name a
remote one. Only the main process tracks (``RANK`` unset or 0), so several processes do not
log the same run several times.

Rows become scalars named ``split/metric`` (``train/loss``, ``eval/rewards/accuracy``) at the row's
step; booleans (``skipped``) are logged as 0/1, other non-numbers are left out.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import LoraDpoError

BACKENDS: dict[str, tuple[str, str]] = {
    # back-end: (module to import, what to install)
    "tensorboard": ("tensorboard", "pip install 'lora-dpo[tensorboard]'"),
    "wandb": ("wandb", "pip install 'lora-dpo[wandb]'"),
    "trackio": ("trackio", "pip install 'lora-dpo[trackio]'"),
}
PROJECT = "lora-dpo"
"""The W&B and trackio project runs are logged to, unless WANDB_PROJECT / TRACKIO_PROJECT say otherwise."""


def is_main_process() -> bool:
    """True unless a launcher (torchrun, accelerate) started this as a process other than rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def check_trackers(config: Any) -> None:
    """A one-line error for a back-end of output.report_to whose package is not installed."""
    for name in config.output.report_to:
        module, install = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise LoraDpoError(f"output.report_to lists {name}, but the {module} package is not installed. "
                               f"Fix: {install}, or remove {name} from output.report_to")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as ``split/metric`` names (step and split themselves excluded)."""
    split = row.get("split", "train")
    out = {}
    for key, value in row.items():
        if key in ("step", "split"):
            continue
        if isinstance(value, bool):
            out[f"{split}/{key}"] = float(value)
        elif isinstance(value, (int, float)):
            out[f"{split}/{key}"] = float(value)
    return out


class Trackers:
    """The open back-ends of one run; with none (or on a process other than the main one) every
    call does nothing."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        for backend in self.backends:
            backend.log(values, int(row["step"]))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def open_trackers(config: Any, out: Path) -> Trackers:
    """The back-ends of output.report_to, opened for the run writing to ``out``."""
    if not config.output.report_to or not is_main_process():
        return Trackers([])
    check_trackers(config)
    opened = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}
    return Trackers([opened[name](config, out) for name in config.output.report_to])


def _flat_config(config: Any) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


class _TensorBoard:
    """Event files in output.dir/tensorboard (``tensorboard --logdir output.dir``)."""

    def __init__(self, config: Any, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat_config(config).items()), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run killed later keeps every row logged so far

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run, offline unless WANDB_MODE is set (``wandb sync output.dir/wandb/offline-run-*``)."""

    def __init__(self, config: Any, out: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.name, dir=str(out),
                              config=_flat_config(config), mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        # W&B refuses steps that go backwards within a run; train and eval rows of one step share it.
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run in its local database (``trackio show`` opens the dashboard)."""

    def __init__(self, config: Any, out: Path):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=out.name,
                                config=_flat_config(config), embed=False)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
