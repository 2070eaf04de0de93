"""Start a training run under ``torchrun`` from Python (the training notebook uses this).

``launch_training(config, nproc_per_node=2)`` runs
``python -m torch.distributed.run --standalone --nproc_per_node=2 -m csa.training <flags from config>``,
streams its output line by line (so a notebook shows progress while it runs), and returns the run's
history and checkpoint path. With CUDA each process takes one GPU (NCCL); on CPU the processes talk
over gloo, so the multi-process path is exercised for real even without GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from csa.training.config import TrainConfig, config_to_argv
from csa.training.train import CHECKPOINT_NAME
from csa.validation import CSAInputError

__all__ = ["torchrun_command", "launch_training"]

#: How ``csa train`` reports an error (see :func:`csa.validation.run_command`).
TRAIN_ERROR = "csa train: error:"


def torchrun_command(config: TrainConfig, nproc_per_node: int = 1) -> list[str]:
    """The full single-node ``torchrun`` command line for ``config``."""
    if nproc_per_node < 1:
        raise CSAInputError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if config.batch_size % nproc_per_node:
        raise CSAInputError(
            f"the global batch size {config.batch_size} is not divisible by nproc_per_node={nproc_per_node}; "
            "choose a batch size that is a multiple of the number of processes")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "csa.training", *config_to_argv(config)]


def launch_training(config: TrainConfig, nproc_per_node: int = 1, echo: Callable[[str], None] = print,
                    threads_per_process: int | None = None) -> dict:
    """Run ``config`` under torchrun, echoing its output; return ``{'history', 'checkpoint', 'output_dir'}``.

    ``threads_per_process`` sets OMP_NUM_THREADS for CPU runs (default: the cores divided evenly).
    The config is checked here first, so a bad value fails at once with :class:`CSAInputError`.
    When the run fails, the ``RuntimeError`` carries the training's own one-line error
    (``csa train: error: ...``) rather than torchrun's traceback.
    """
    config.check()
    cmd = torchrun_command(config, nproc_per_node)
    env = dict(os.environ)
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    echo("$ " + " ".join(cmd[1:]))
    tail: list[str] = []
    error: str | None = None  # the first line of the training's own error report
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm redraws with carriage returns: show only the final state of each line
            line = raw.rstrip("\n").split("\r")[-1]
            tail = (tail + [line])[-30:]
            if line.startswith(TRAIN_ERROR) and error is None:
                error = line[len(TRAIN_ERROR):].strip()
            echo(line)
        code = proc.wait()
    if code != 0:
        if error is not None:  # the training's own message, not torchrun's traceback
            raise RuntimeError(f"training failed: {error}")
        raise RuntimeError(f"training exited with status {code}; last output:\n" + "\n".join(tail))
    out = Path(config.output_dir)
    history_file = out / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else None
    return {"history": history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out}
