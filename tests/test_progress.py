"""Progress bars (tasks/platform/progress.py): drawn on a terminal, quiet under CI and in pipes and logs,
forced either way by DISTILLERY_PROGRESS; the train loop's epoch bar changes nothing it computes."""
import fcntl
import io
import os
import pty
import struct
import sys
import termios

import pytest
import torch

import models
import models.vision  # noqa: F401  (registers the digits models)
from models.distill import DistillationLoss
from tasks.platform.params import TrainParams
from tasks.platform.progress import ENV, dask_progress, progress_bar, progress_enabled
from tasks.train.loop import fit
from test_train_loop import Toy, accuracy, forward


class Terminal:
    """A pseudo-terminal's two ends: `stream`, a text file on the terminal side (isatty() is true),
    and `read()`, what was written to it."""

    def __init__(self):
        self._master, slave = pty.openpty()
        # 24 rows x 120 columns: a new pty is 0 x 0, and tqdm fits its bar into the width it reads
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.stream = os.fdopen(slave, "w", buffering=1)

    def read(self) -> str:
        self.stream.flush()
        os.set_blocking(self._master, False)
        chunks = []
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def close(self):
        self.stream.close()
        os.close(self._master)


@pytest.fixture
def terminal():
    t = Terminal()
    yield t
    t.close()


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    """Each test sets the environment it is about: CI runners export CI=true."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(ENV, raising=False)


def test_a_bar_is_drawn_on_a_terminal_only(terminal):
    assert terminal.stream.isatty()
    assert progress_enabled(terminal.stream)
    assert not progress_enabled(io.StringIO())                # a pipe or a log file


def test_ci_silences_bars_even_on_a_terminal(terminal, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(terminal.stream)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("off", False)])
def test_the_override_wins_over_ci_and_the_terminal_check(value, expected, terminal, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv(ENV, value)
    assert progress_enabled(terminal.stream) is expected
    assert progress_enabled(io.StringIO()) is expected


def test_an_unknown_override_falls_back_to_the_automatic_rule(terminal, monkeypatch):
    monkeypatch.setenv(ENV, "sometimes")
    assert progress_enabled(terminal.stream) and not progress_enabled(io.StringIO())


def test_the_bar_is_written_to_the_terminal_and_not_to_a_pipe(terminal, monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    assert list(progress_bar(range(3), desc="extracting", unit="video")) == [0, 1, 2]
    drawn = terminal.read()
    assert "extracting" in drawn and "3/3" in drawn
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    bar = progress_bar(range(3), desc="extracting")
    assert bar.disable and list(bar) == [0, 1, 2]
    assert piped.getvalue() == ""


def test_a_caller_can_keep_its_bar_off_on_other_ranks(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert not progress_bar(total=3, enabled=True).disable
    assert progress_bar(total=3, enabled=False).disable


def test_dask_progress_counts_the_tasks_of_a_computation(monkeypatch, capsys):
    import dask.array as da
    monkeypatch.setenv(ENV, "1")
    x = da.ones((8, 8), chunks=(2, 8))
    with dask_progress("era5 chunks"):
        assert float(x.sum().compute()) == 64.0
    err = capsys.readouterr().err
    assert "era5 chunks" in err and "task" in err


def train(monkeypatch, progress: str):
    monkeypatch.setenv(ENV, progress)
    torch.manual_seed(0)
    model = models.create_model("digits_mlp_tiny", hidden=16)
    val = Toy(32, 1)
    cfg = TrainParams(epochs=3, batch_size=32, lr=0.01, val_every=2)
    history = fit(model, DistillationLoss({"ce": {}}), Toy(128, 0), cfg, seed=0, forward=forward,
                  validate=lambda m: accuracy(m, val), progress="hinton_kd · student_labels seed 0")
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history], model


def test_the_epoch_bar_shows_the_latest_losses_and_changes_no_result(monkeypatch, capsys):
    drawn_history, drawn_model = train(monkeypatch, "1")
    err = capsys.readouterr().err
    assert "hinton_kd · student_labels seed 0" in err and "3/3" in err
    assert "train_loss=" in err and "val_accuracy=" in err
    quiet_history, quiet_model = train(monkeypatch, "0")
    assert capsys.readouterr().err == ""
    assert drawn_history == quiet_history
    for a, b in zip(drawn_model.state_dict().values(), quiet_model.state_dict().values()):
        assert torch.equal(a, b)
