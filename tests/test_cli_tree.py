"""One parser for every `csa` sub-command: each wing's verbs run through the same tree and the same exit-code
policy; `python -m csa.training` is `csa train`; the release records the launcher's torchrun command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from _subprocess import finish, start
from csa.cli import build_parser, main
from csa.cli_errors import run_command
from csa.training.config import TrainConfig, config_from_args, config_to_argv
from csa.training.launch import torchrun_command, torchrun_text
from csa.validation import CSAError, CSAInputError

REPO = Path(__file__).resolve().parents[1]

#: Every verb of the tree with the least arguments it parses (names of files need not exist to parse).
COMMANDS = {
    "train": ["train", "--dry-run"],
    "download": ["download", "--list"],
    "batch": ["batch", "nb.ipynb", "--out", "out"],
    "rerank": ["rerank", "--data-root", "d", "--dataset", "x", "--features", "f", "--checkpoint", "c.pth"],
    "evaluate": ["evaluate", "--data-root", "d", "--dataset", "x", "--features", "f"],
    "extract": ["extract", "demo", "--data-root", "d"],
    "demo build": ["demo", "build"],
    "demo extract": ["demo", "extract"],
    "demo release": ["demo", "release"],
    "demo select": ["demo", "select", "--trainset", "rparis6k-mini-train", "--out", "o.csv"],
    "demo seeds": ["demo", "seeds", "--trainset", "rparis6k-mini-train", "--out", "o.csv", "--setting", "s"],
    "demo curve": ["demo", "curve", "--trainset", "roxford5k-mini-train", "--out", "o.csv", "--setting", "s"],
}


def test_every_sub_command_parses_to_a_function_of_its_wing():
    parser = build_parser()
    wings = {"train": "csa.training.command", "download": "csa.data.command", "batch": "csa.notebook.command",
             "rerank": "csa.cli", "evaluate": "csa.cli", "extract": "csa.descriptors.command",
             "demo": "csa.experiments.command"}
    for name, argv in COMMANDS.items():
        args = parser.parse_args(argv)
        assert callable(args.run), name
        assert args.run.__module__ == wings[name.split()[0]], (name, args.run.__module__)
        assert args.own_parser.prog == f"csa {name}"


def test_an_unknown_flag_is_the_sub_command_usage_error(capsys):
    for name in ("train", "demo seeds", "batch"):
        with pytest.raises(SystemExit) as exit_info:
            main([*COMMANDS[name], "--no-such-flag"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"csa {name}: error: unrecognized arguments: --no-such-flag" in err, err


@pytest.mark.parametrize("error, status", [
    (CSAInputError("bad shape; fix it"), 2), (CSAError("download failed"), 1), (OSError(28, "No space left"), 1),
    (KeyboardInterrupt(), 130), (ZeroDivisionError("division by zero"), 1),
])
def test_run_command_turns_each_error_into_one_line_and_its_status(error, status, capsys, monkeypatch):
    monkeypatch.delenv("CSA_TRACEBACK", raising=False)

    def body():
        raise error

    assert run_command("csa x", body) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("csa x: ") and "Traceback" not in err
    assert run_command("csa x", lambda: None) == 0 and run_command("csa x", lambda: 3) == 3


def test_the_training_module_is_the_train_command(tmp_path):
    """`python -m csa.training ...` and `csa train ...` give the same resolved configuration."""
    argv = ["--recipe", "demo", "--batch-size", "32", "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outputs = []
    for cmd in ([sys.executable, "-m", "csa.training", *argv], [sys.executable, "-m", "csa", "train", *argv]):
        proc = start(cmd, cwd=tmp_path, env=env, stdout=-1, stderr=-1)
        out, err = finish(proc)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    assert outputs[0] == outputs[1]
    assert outputs[0]["config"]["recipe"] == "demo" and outputs[0]["config"]["batch_size"] == 32


def test_the_recorded_release_command_is_the_launchers_torchrun_command():
    config = TrainConfig.from_recipe("demo-paris", data_root="data/demo", trainset="rparis6k-mini-train",
                                     feature_names=["lite0-gem"], output_dir="runs/demo/rparis6k-mini-train")
    text = torchrun_text(config, 2)
    # the form the manifest of data/demo/weights records, written out by hand
    assert text == "torchrun --standalone --nproc_per_node=2 -m csa.training " + " ".join(config_to_argv(config))
    launched = torchrun_command(config, 2)
    assert launched[1:3] == ["-m", "torch.distributed.run"] and text.split()[1:] == launched[3:]
    with pytest.raises(CSAInputError, match="not divisible"):
        torchrun_text(TrainConfig.from_recipe("demo", batch_size=33), 2)


def test_the_launcher_rebuilds_the_commands_the_release_manifest_recorded():
    """Each released model's command (written when `csa demo release` still spelled it out by hand) parses as
    `csa train` flags, and the launcher's builder gives the same text back from the configuration they make."""
    manifest = REPO / "data" / "demo" / "weights" / "manifest.json"
    if not manifest.is_file():
        pytest.skip("no released demo weights in this checkout")
    for name, entry in json.loads(manifest.read_text()).items():
        words = entry["command"].split()
        assert words[:2] == ["torchrun", "--standalone"] and words[2].startswith("--nproc_per_node="), name
        assert words[3:5] == ["-m", "csa.training"], name
        args = build_parser().parse_args(["train", *words[5:]])
        assert args.run.__module__ == "csa.training.command" and args.recipe == entry["recipe"]
        config, _ = config_from_args(args)
        assert torchrun_text(config, int(words[2].split("=")[1])) == entry["command"], name
