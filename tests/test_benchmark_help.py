"""Every benchmark's --help prints and exits 0, at every subcommand (a help text with a stray % once crashed one)."""

import importlib

import pytest

COMMANDS = [("bank_frontier", "collect"), ("bank_frontier", "report"), ("bank_isolation", None), ("bank_verify", None),
            ("encoder_speed", None), ("evaluate", None), ("gpu", None), ("growth", None), ("line", "collect"),
            ("line", "report"), ("lot_pairs_speed", None), ("lot_scaling", "time"), ("lot_scaling", "accuracy"),
            ("lot_size", None), ("online_speed", None), ("ood", "collect"), ("ood", "report"), ("ood", "capture"),
            ("ood", "lookalikes"), ("parity", None),
            ("perf_analyzer", None), ("protocol", None), ("scoring_speed", None), ("serving_parity", None),
            ("serving_speed", None)]


@pytest.mark.parametrize("module,command", COMMANDS)
def test_benchmark_help(module, command, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"] if command else ["--help"])
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out
