"""Training logs: a CSV of per-step metrics (``train_log.csv``), TensorBoard events when the package is installed,
and the Python loggers of compresskit's modules (console under ``compresskit apply``, ``run.log`` in the output
folder). Configured by a recipe's ``logging:`` section (:class:`~compresskit.recipe.LoggingConfig`)."""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from .atomic import write_text
from .errors import OutputError

LOG_NAME = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
RUN_LOG = "run.log"
BASE_COLUMNS = ("step", "epoch", "loss", "smoothed_loss", "lr", "steps_per_s", "elapsed_s")
LOGGER = "compresskit"

log = logging.getLogger(__name__)


def read_csv_log(path: str, up_to_step: int | None = None) -> tuple[list[str], list[dict[str, float]]]:
    """(columns, rows as floats) of a ``train_log.csv``; rows after ``up_to_step`` are left out (a resumed run
    rewrites what the interrupted one logged past its last checkpoint)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            values = {k: _number(v) for k, v in row.items() if k is not None}
            if up_to_step is None or values.get("step", 0) <= up_to_step:
                rows.append(values)
    return columns, rows


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


class TrainLog:
    """Per-step metrics of one training run: appended to ``train_log.csv`` (flushed every row), written as
    TensorBoard scalars, and kept in :attr:`rows` for the report's plots.

    ``writer``: whether this process writes files (rank 0 of a distributed run); every rank keeps the rows.
    ``start_step`` > 0 continues a resumed run: logged rows after it are dropped (the CSV is rewritten atomically)
    and TensorBoard purges its events after it.
    """

    def __init__(self, cfg: Any, out_dir: str | None, writer: bool = True, start_step: int = 0) -> None:
        self.cfg = cfg
        self.every = cfg.every if cfg is not None else 10
        self.rows: list[dict[str, float]] = []
        self.columns: list[str] = []
        self.path = os.path.join(out_dir, LOG_NAME) if out_dir and cfg is not None and cfg.csv else None
        self._file = None
        self._csv: csv.DictWriter | None = None
        self._tb = None
        self._last: tuple[int, float] | None = None
        self._start_time = time.perf_counter()
        if self.path and os.path.exists(self.path) and start_step > 0:
            self.columns, self.rows = read_csv_log(self.path, start_step)
            if writer:
                self._rewrite()
        if not writer:
            self.path = None
        elif self.path and start_step == 0 and os.path.exists(self.path):
            os.unlink(self.path)
        if writer and out_dir and cfg is not None and cfg.tensorboard != "never":
            self._tb = _tensorboard(os.path.join(out_dir, TENSORBOARD_DIR), start_step, cfg.tensorboard)
        if self.rows:
            self._start_time -= self.rows[-1].get("elapsed_s", 0.0) or 0.0

    def due(self, step: int, last: bool) -> bool:
        """Whether ``step`` gets a row: every :attr:`every` steps and the last one."""
        return last or step % self.every == 0

    def record(self, step: int, epoch: int, loss: float, smoothed: float, lr: float,
               metrics: dict[str, float]) -> dict[str, float]:
        """Log one row (base columns then each stage's metrics); returns it."""
        now = time.perf_counter()
        if self._last is not None and step > self._last[0]:
            rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        else:
            rate = math.nan
        self._last = (step, now)
        row = {"step": step, "epoch": epoch, "loss": loss, "smoothed_loss": smoothed, "lr": lr,
               "steps_per_s": rate, "elapsed_s": now - self._start_time, **metrics}
        self.rows.append(row)
        if self.path:
            self._append(row)
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "elapsed_s") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        return row

    def _append(self, row: dict[str, float]) -> None:
        if not self.columns:
            self.columns = list(row)
        try:
            if self._file is None:
                fresh = not os.path.exists(self.path)
                self._file = open(self.path, "a", newline="")
                self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
                if fresh:
                    self._csv.writeheader()
            self._csv.writerow({k: _cell(row.get(k)) for k in self.columns})
            self._file.flush()
        except OSError as e:
            raise OutputError(self.path, f"cannot write the training log ({e.strerror or e})") from None

    def _rewrite(self) -> None:
        """The CSV holding only :attr:`rows` (written atomically: the previous log stays until it is replaced)."""
        lines = [",".join(self.columns)] + [",".join(_cell(r.get(k)) for k in self.columns) for r in self.rows]
        write_text(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("" if math.isnan(value) else str(value))
    return str(value)


def _tensorboard(log_dir: str, start_step: int, mode: str):
    """A SummaryWriter (events after ``start_step`` purged on resume), or None when tensorboard is not installed
    (``auto``; the validator refuses ``always`` without it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "always":
            raise
        log.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir, purge_step=start_step if start_step > 0 else None)


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through tqdm, so progress bars are not torn by log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:   # logging must never stop a run
            self.handleError(record)


@contextmanager
def console_log(level: str) -> Iterator[None]:
    """While the block runs, print compresskit's log records at ``level`` to stderr, and only there (the CLI
    does this; a library caller configures logging itself)."""
    root = logging.getLogger(LOGGER)
    handler = _TqdmHandler()
    handler.setLevel(level.upper())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = root.level, root.propagate
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > handler.level:
        root.setLevel(handler.level)
    root.propagate = False   # the CLI owns the console: a root handler some import set up would print twice
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous[0])
        root.propagate = previous[1]


@contextmanager
def run_log(out_dir: str | None, level: str, writer: bool = True) -> Iterator[None]:
    """Write compresskit's log records at ``level`` to ``out_dir/run.log`` while the block runs (appended, so a
    resumed run continues it)."""
    if not out_dir or not writer:
        yield
        return
    root = logging.getLogger(LOGGER)
    handler = logging.FileHandler(os.path.join(out_dir, RUN_LOG), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level.upper())
    previous = root.level
    if root.level == logging.NOTSET or root.level > handler.level:
        root.setLevel(handler.level)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous)
