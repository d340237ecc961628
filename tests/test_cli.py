"""One command a user can learn (issue 28): the pa-clip console script, every flag of every command checked against a
stated range before any work, exit statuses that mean one thing, --help at every level."""

import argparse
import math
import os
import socket
import subprocess
import sys

import pytest

from cli import main as cli
from client import exits
from postprocess.flags import Bounded

ROOT = cli.__file__.rsplit("/cli/", 1)[0]

# Flags that take free text, a path, a URL or a key: nothing to bound (every other value-taking flag must have a
# range or choices: a new numeric flag without one fails here)
FREE = {"--images", "--category", "--bank", "--mode", "--set", "--out", "--threshold", "--url", "--key", "--repository",
        "--banks", "--host", "--metrics-host", "--log", "--tritonserver", "--model", "--pretrained", "--onnx",
        "--timing-cache", "--data", "--backbone", "--variant", "--categories", "bank"}


def parsers():
    """(command, parser, the arguments it needs besides the one tested) for every command and export's two."""
    from benchmarks import evaluate
    from client import banks, infer
    from export import __main__ as export
    from serve import __main__ as serve, main_job

    export_parser = export.build_parser("pa-clip export")
    sub = next(a for a in export_parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("score", infer.build_parser("pa-clip score"), ["--images", "x"]),
            ("banks", banks.build_parser("pa-clip banks"), ["list"]),
            ("serve", serve.build_parser("pa-clip serve"), []),
            ("export onnx", sub.choices["onnx"], []),
            ("export tensorrt", sub.choices["tensorrt"], []),
            ("evaluate", evaluate.build_parser("pa-clip evaluate"), ["--data", "d", "--dataset", "mvtec", "--out", "o"]),
            ("main", main_job.build_parser("pa-clip main"), [])]


def value_flags():
    for command, parser, needed in parsers():
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not isinstance(action, argparse._HelpAction):
                yield command, parser, needed, action


def test_every_value_a_command_takes_is_bounded_chosen_or_free_text():
    loose = [f"{command} {action.option_strings[0]}" for command, _, _, action in value_flags()
             if not isinstance(action.type, Bounded) and action.choices is None
             and action.option_strings[0] not in FREE and action.dest != "version"]
    assert not loose, f"flags without a range or choices: {loose}"


def edges(bounded: Bounded):
    """(text, accepted) at and just past each end, and values no number range takes."""
    step = 1 if bounded.kind is int else max(1e-6, abs(bounded.high - bounded.low) * 1e-6)
    fmt = (lambda v: str(int(v))) if bounded.kind is int else repr
    yield fmt(bounded.low), not bounded.open_low
    yield fmt(bounded.low - step), False
    if math.isfinite(bounded.high):
        yield fmt(bounded.high), not bounded.open_high
        yield fmt(bounded.high + step), False
    yield "nan", False
    yield "abc", False
    if bounded.kind is int:
        yield f"{bounded.low}.5", False


CASES = [(command, action.option_strings[0], text, ok, needed, parser)
         for command, parser, needed, action in value_flags() if isinstance(action.type, Bounded)
         for text, ok in edges(action.type)]


@pytest.mark.parametrize("command,flag,text,ok,needed,parser", CASES,
                         ids=[f"{c[0]} {c[1]}={c[2]}" for c in CASES])
def test_each_bounded_flag_at_its_edges(command, flag, text, ok, needed, parser, capsys):
    action = next(a for a in parser._actions if flag in a.option_strings)
    # the = form: a negative value is not read as an option; before what the command needs, which may be a
    # subcommand (banks' own options come before it)
    argv = [f"{flag}={text}"] + needed
    if ok:
        parser.parse_args(argv)
        return
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(argv)
    assert stopped.value.code == exits.USAGE
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and f"must be {action.type.describe()}, got {text!r}" in err


def test_the_console_script_dispatches_and_helps_at_every_level(capsys):
    assert cli.main([]) == exits.USAGE and "pa-clip score" in capsys.readouterr().err
    for argv in (["--help"], ["score", "--help"], ["banks", "update", "--help"], ["serve", "--help"],
                 ["export", "onnx", "--help"], ["evaluate", "--help"], ["main", "--help"]):
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 0, argv
        assert capsys.readouterr().out.startswith("usage: pa-clip"), argv
    with pytest.raises(SystemExit) as stopped:
        cli.main(["nope"])
    assert stopped.value.code == exits.USAGE and "invalid choice: 'nope'" in capsys.readouterr().err
    assert "exit status: 0 done; 1" in exits.HELP


def test_run_sh_help_needs_no_set_up():
    env = dict(os.environ, PA_CLIP_VENV="/nonexistent-venv")  # as on a fresh machine: nothing installed
    for args, status in ((["--help"], 0), (["help"], 0), (["main", "--help"], 0), (["bogus"], 2)):
        proc = subprocess.run(["bash", f"{ROOT}/run.sh", *args], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == status, (args, proc.stderr)
        assert "./run.sh main" in proc.stdout and "installing" not in proc.stderr, args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exit_statuses_without_a_server(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "parts"
    images.mkdir()
    Image.new("RGB", (64, 64), (120, 120, 120)).save(images / "a.png")
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert cli.main(["score", "--images", str(images), "--bank", "b", "--url", url, "--out", str(tmp_path / "o")]) \
        == exits.UNREACHABLE
    assert "no Triton server answers" in capsys.readouterr().err
    assert cli.main(["banks", "--url", url, "list"]) == exits.UNREACHABLE
    # usage: the messages say what to pass or what was found
    assert cli.main(["score", "--images", str(images), "--category", "Schraube groß"]) == exits.USAGE
    assert "name the bank with --bank, e.g. --bank Schraube_gro" in capsys.readouterr().err
    # a number the command line gives is checked before the server is asked (it was 3 here, 2 with a server)
    assert cli.main(["score", "--images", str(images), "--bank", "b", "--url", url, "--image-size", "64", "64",
                     "64"]) == exits.USAGE
    assert "--image-size takes SIZE or HEIGHT WIDTH, got 3 numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_mode:  # refused here, not by the server after the lot was sent
        cli.main(["score", "--images", str(images), "--category", "b", "--build", "--url", url, "--mode", "padd"])
    assert bad_mode.value.code == exits.USAGE and "invalid choice: 'padd'" in capsys.readouterr().err
    assert cli.main(["score", "--images", str(tmp_path / "missing"), "--bank", "b"]) == exits.USAGE
    assert "no such folder or file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["score", "--images", str(tmp_path / "empty"), "--bank", "b"]) == exits.USAGE
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    assert cli.main(["score", "--images", str(tmp_path / "notes"), "--bank", "b"]) == exits.USAGE
    assert "holds no images (1 other file(s)" in capsys.readouterr().err
    # another run's results in --out: refused unless --overwrite, and nothing of them is lost before the server answers
    out = tmp_path / "previous"
    (out / "overlays").mkdir(parents=True)
    (out / "results.csv").write_text("rank\n")
    (out / "results.json").write_text('{"images": [], "outputs": ["overlays"]}')
    assert cli.main(["score", "--images", str(images), "--bank", "b", "--url", url, "--out", str(out)]) == exits.USAGE
    assert "holds another run's results (results.csv, results.json, overlays): pass --overwrite" in \
        capsys.readouterr().err
    assert cli.main(["score", "--images", str(images), "--bank", "b", "--url", url, "--out", str(out),
                     "--overwrite"]) == exits.UNREACHABLE
    assert (out / "results.csv").exists() and (out / "overlays").is_dir()


def test_the_module_forms_still_work():
    for argv in (["client/infer.py", "--help"], ["-m", "client.banks", "--help"], ["-m", "cli", "--help"]):
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), argv
