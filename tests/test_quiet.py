"""Quiet by default: TensorFlow's start-up lines filtered (never a real error), messages
through ``logging`` with -q / -v."""

import os
import subprocess
import sys

import pytest

from core import quiet
from core.progress import debug, info, progress_iter, set_verbosity, warn


@pytest.fixture(autouse=True)
def _restore_level():
    yield
    set_verbosity(0)


def test_start_up_noise_is_dropped_and_everything_else_kept(capfd):
    with quiet.filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are\n")
        os.write(2, b"I0000 00:00 port.cc:153] oneDNN custom operations are on. You may\n")
        os.write(2, b"E0000 something real went wrong\n")
    err = capfd.readouterr().err
    assert err == "E0000 something real went wrong\n"


def _import_tf(verbosity: str) -> str:
    env = {**os.environ, "BLOODBENCH_VERBOSITY": verbosity}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import core, keras; import tensorflow as tf; print(tf.__version__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def test_importing_tensorflow_through_bloodbench_is_quiet():
    assert not [ln for ln in _import_tf("0").splitlines() if quiet.NOISE.search(ln)]
    loud = _import_tf("1")  # -v: TensorFlow's own lines, as it writes them
    if not any(quiet.NOISE.search(ln) for ln in loud.splitlines()):
        pytest.skip("this TensorFlow build writes no start-up lines here")


def test_quiet_and_verbose_levels(capsys):
    set_verbosity(-1)
    info("an info line")
    warn("a warning line")
    debug("a debug line")
    assert list(progress_iter(range(3), 3, "bar")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "a warning line" in err and "an info line" not in err and "debug" not in err
    assert os.environ["BLOODBENCH_VERBOSITY"] == "-1"  # what worker processes start with
    set_verbosity(1)
    debug("a debug line")
    info("an info line")
    err = capsys.readouterr().err
    assert "a debug line" in err and "an info line" in err
    set_verbosity(0)
    debug("hidden")
    info("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err


def test_the_cli_takes_q_and_v(tmp_path, capsys):
    from bench.commands.cli import main

    assert main(["init", str(tmp_path / "a"), "-q"]) == 0
    assert main(["init", str(tmp_path / "b"), "-v"]) == 0
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "c"), "-q", "-v"])
