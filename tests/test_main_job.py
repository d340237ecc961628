"""The main job's encoder choice, without a server: CLIP when its weights are here, else the DINOv2 proxy, decided
by catching WeightsNotFound (not by reading a child's stderr)."""

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from serve import main_job


def args_for(repository, backbone):
    return SimpleNamespace(repository=str(repository), reexport=False, backbone=backbone, model="ViT-L-14-336",
                           pretrained="openai")


def test_missing_clip_weights_fall_back_to_the_proxy_and_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fingerprint = main_job.export(args_for(tmp_path / "repo", "auto"))
    assert fingerprint["backbone"].startswith("dinov2")
    assert "no CLIP weights on this machine" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["clip_vision", "pa_clip", "pa_clip_bank",
                                                                      "pa_clip_score"]
    # the next run reuses it
    assert main_job.export(args_for(tmp_path / "repo", "auto")) == fingerprint
    assert "using the encoder already in" in capsys.readouterr().err
    # one exported before encoders said which sizes they take is exported again (it would serve squares only)
    encoder_file = tmp_path / "repo" / "clip_vision" / "encoder.json"
    old = {k: v for k, v in json.loads(encoder_file.read_text()).items() if k != "dynamic_size"}
    encoder_file.write_text(json.dumps(old))
    assert main_job.export(args_for(tmp_path / "repo", "auto"))["dynamic_size"] is True
    assert "exported before H x W inputs" in capsys.readouterr().err


def test_clip_asked_for_without_weights_stops_with_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    with pytest.raises(SystemExit) as stopped:
        main_job.export(args_for(tmp_path / "repo", "clip"))
    assert stopped.value.code == 2  # bad usage or inputs, as every command's exit status says (a message exits 1)
    assert "--pretrained" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_what_the_scoring_run_would_refuse_is_refused_before_the_export(tmp_path, monkeypatch, capsys):
    """A mistyped folder, a threshold out of range or a category that makes no bank id were refused only after minutes
    of export and server start; and every category in another script shared the bank id 'lot', which main rebuilds."""
    from PIL import Image

    def exported(args):
        raise AssertionError("exported before the inputs were checked")

    monkeypatch.setattr(main_job, "export", exported)
    parts = tmp_path / "螺丝"
    parts.mkdir()
    Image.new("RGB", (32, 32)).save(parts / "a.png")
    cases = [(["--images", str(tmp_path / "nowhere")], "no such folder"),
             (["--images", str(parts), "--category", "washer", "--threshold", "7"], "strictly between 0 and 1"),
             (["--images", str(parts)], "makes no bank id"),
             (["--http-port", "18000", "--grpc-port", "18000"], "must differ"),
             # from a review of the main job: refused after the export and the server's start before
             (["--images", str(parts), "--category", "washer"], "a lot of 1 image(s) cannot be scored")]
    (parts / "notes.png").write_text("not an image")
    cases.append((["--images", str(parts), "--category", "washer"], "1 file(s) could not be read as images: "))
    copies = tmp_path / "copies"  # refused by the server after the export, the start and the upload (exit 4)
    copies.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32)).save(copies / f"{i}.png")
    cases.append((["--images", str(copies), "--category", "washer"], "(1 different: copies of an image are one)"))
    for argv, words in cases:
        assert main_job.main(argv + ["--out", str(tmp_path / "out")]) == 2, argv
        assert words in capsys.readouterr().err, argv
    # an --out that is a file, or lies under one: a traceback and status 1 before (the demo lot was written first)
    (tmp_path / "a_file").write_text("x")
    for out, words in ((tmp_path / "a_file", "is a file, not a folder"),
                       (tmp_path / "a_file" / "sub", "cannot be written")):
        assert main_job.main(["--out", str(out)]) == 2
        assert words in capsys.readouterr().err


def test_relative_paths_given_through_run_sh_are_the_callers(tmp_path, monkeypatch):
    """run.sh moves to the project folder: --images photos/ from elsewhere was "no such folder", and a relative --out
    landed in the project."""
    from serve.local import CALLER_DIR, from_caller

    parser = main_job.build_parser("x")
    args = parser.parse_args(["--images", "photos", "--out", "/abs/out", "--banks", "banks"])
    monkeypatch.setenv(CALLER_DIR, str(tmp_path))
    from_caller(args, parser, ("images", "out", "repository", "banks"))
    assert (args.images, args.out, args.repository, args.banks) == (str(tmp_path / "photos"), "/abs/out",
                                                                     "model_repository", "banks")


def test_ports_asked_for_one_role_are_not_taken_for_another():
    """--http-port 8001 was given the usual 8001 as its gRPC port too: the start could never succeed."""
    from serve.local import free_ports

    usual = tuple(free_ports(3))
    for role in range(3):
        asked = tuple(usual[1] if i == role else None for i in range(3))
        picked = main_job.pick_ports(asked, usual)
        assert len(set(picked)) == 3 and picked[role] == usual[1], (asked, picked)


def test_a_run_leaves_the_newest_server_logs_and_removes_the_older_ones(tmp_path):
    """One log per run piled up in --out; the newest KEPT_LOGS stay (the new run's among them), nothing else goes."""
    names = [f"tritonserver-202612{day:02d}-120000-{day}.log" for day in range(1, 9)]
    for name in names:
        (tmp_path / name).write_text("log")
    (tmp_path / "results.csv").write_text("rank")
    main_job.prune_logs(tmp_path, main_job.KEPT_LOGS - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"] + names[-(main_job.KEPT_LOGS - 1):]


def test_reexport_exports_again_over_an_encoder_the_repository_already_has(tmp_path, monkeypatch, capsys):
    """--reexport is how a user replaces an encoder the repository holds: it must not be reused like a plain rerun."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main_job.export(args_for(tmp_path / "repo", "auto"))
    capsys.readouterr()
    # mark the exported fingerprint: a real export writes a fresh one, a reuse returns (and keeps) the marked one
    encoder_file = tmp_path / "repo" / "clip_vision" / "encoder.json"
    marked = dict(json.loads(encoder_file.read_text()), left_by_the_first_export=True)
    encoder_file.write_text(json.dumps(marked))
    args = args_for(tmp_path / "repo", "auto")
    args.reexport = True
    fingerprint = main_job.export(args)
    err = capsys.readouterr().err
    assert "exporting the DINOv2" in err
    assert "using the encoder already in" not in err
    assert "left_by_the_first_export" not in fingerprint
    assert "left_by_the_first_export" not in json.loads(encoder_file.read_text())


def test_a_second_export_into_the_same_repository_waits_for_the_first_and_says_so(tmp_path, capsys):
    """Two jobs writing one repository at once would mix their files: the export lock makes the second wait (and
    tell the user why it is waiting) until the first lets go."""
    repo = tmp_path / "repo"
    first_holds, first_may_go, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with main_job.exporting(repo):
            first_holds.set()
            first_may_go.wait(5)

    def second():
        with main_job.exporting(repo):
            second_in.set()

    holder = threading.Thread(target=first)
    holder.start()
    assert first_holds.wait(5)
    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        assert not second_in.wait(0.5), "the second export got the lock while the first held it"
        assert f"another job is exporting into {repo}: waiting" in capsys.readouterr().err
    finally:
        first_may_go.set()
        holder.join(5)
    assert second_in.wait(2)  # and gets it once the first is done
    waiter.join(5)


def test_the_flags_the_lot_checks_ask_for_are_the_main_jobs_too():
    """The lot checks' warnings say "add --orientation majority" and "give ... --bit-depth": main refused both as
    unrecognized arguments."""
    args = main_job.build_parser().parse_args(["--orientation", "majority", "--bit-depth", "12"])
    assert (args.orientation, args.bit_depth) == ("majority", 12)
    assert main_job.build_parser().parse_args([]).orientation == "keep"


def test_the_summary_counts_each_decision_as_itself_and_names_the_size_the_lot_was_sent_at(tmp_path, capsys):
    """Out-of-distribution and invalid images were counted as normal, and the size said was the encoder's default
    long side ("at 336px"), not the 84x336 the lot went in at."""
    decisions = ["anomalous", "normal", "normal", "out_of_distribution", "invalid"]
    results = {"bank": {"bank": "strips", "n_images": 5, "normal_selection": "visual", "image_size": [84, 336]},
               "decision": {"threshold": 0.1, "method": "quartile_exponential", "false_alarm_rate": 0.01},
               "images": [{"path": f"{i}.png", "score": 0.1 * i, "decision": d} for i, d in enumerate(decisions)]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    main_job.report(tmp_path, {"backbone": "dinov2-vit-s14", "image_size": 336}, None)
    err = capsys.readouterr().err
    assert "images sent at 84x336 (height x width)" in err
    assert "decisions: 2 normal, 1 anomalous, 1 out of distribution, 1 invalid (threshold" in err


def test_the_summary_names_a_threshold_given_by_hand_as_the_one_that_decided(tmp_path, capsys):
    """With --threshold the decisions used the user's threshold, but the summary named the automatic one (and its
    confidence statement) as if it had decided."""
    from postprocess.decision import calibrate

    cal = calibrate(np.linspace(0.1, 0.2, 36))
    decision = {**cal.to_dict(), "threshold_calibrated": 0.01, "threshold_source": "--threshold"}
    results = {"bank": {"bank": "b", "n_images": 36, "normal_selection": "visual", "image_size": [32, 32]},
               "decision": decision, "images": [{"path": "a.png", "score": 0.15, "decision": "anomalous"}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    main_job.report(tmp_path, {"backbone": "x", "image_size": 32}, None)
    err = capsys.readouterr().err
    assert f"(threshold {cal.raw(0.01):.4g}, --threshold 0.01 given by hand; the automatic one: {cal.threshold:.4g} " in err
    assert cal.confidence()["text"] not in err
    results["decision"] = {**cal.to_dict(), "threshold_calibrated": 0.5, "threshold_source": "auto"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    main_job.report(tmp_path, {"backbone": "x", "image_size": 32}, None)
    err = capsys.readouterr().err
    assert f"(threshold {cal.threshold:.4g} from the lot itself" in err and cal.confidence()["text"] in err


def test_without_run_sh_the_paths_given_are_left_as_typed(monkeypatch):
    """Without run.sh (no caller folder recorded) the process runs where the user is: a relative path is already
    theirs and must not be rewritten against any folder."""
    from serve.local import CALLER_DIR, from_caller

    monkeypatch.delenv(CALLER_DIR, raising=False)
    parser = main_job.build_parser("x")
    args = parser.parse_args(["--images", "photos", "--out", "results", "--banks", "banks"])
    from_caller(args, parser, ("images", "out", "repository", "banks"))
    assert (args.images, args.out, args.repository, args.banks) == ("photos", "results", "model_repository", "banks")


def test_the_usual_ports_are_picked_when_all_three_are_free():
    """The README's ports (8000-8002) are what a user's client and scraper expect: free, they are the ones used."""
    from serve.local import free_ports

    usual = tuple(free_ports(3))
    assert main_job.pick_ports((None, None, None), usual) == usual
    assert main_job.DEFAULT_PORTS == (8000, 8001, 8002)


def test_one_taken_usual_port_moves_every_role_to_a_free_port(capsys):
    """A usual port held by another server is never picked, and then none of the usual three is (a job taking them
    binds the metrics port last: one free usual port is no sign it stays free)."""
    import socket

    from serve.local import free_ports, listen_free

    usual = tuple(free_ports(3))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", usual[1]))
        holder.listen()
        picked = main_job.pick_ports((None, None, None), usual)
        assert usual[1] not in picked and len(set(picked)) == 3
        assert picked[0] != usual[0] and picked[2] != usual[2]
        assert all(listen_free("127.0.0.1", p) for p in picked)
    assert "are taken" in capsys.readouterr().err


def test_server_logs_are_pruned_by_the_time_in_their_names_not_by_file_times(tmp_path):
    """Logs are named by their run's start time: a log copied or touched later (a backup, a tail -f editor) must not
    make an old run's log outlive newer runs' ones."""
    import os

    names = [f"tritonserver-202612{day:02d}-120000-{day}.log" for day in range(1, 9)]
    for age, name in enumerate(names):  # the newest name has the oldest file time
        (tmp_path / name).write_text("log")
        os.utime(tmp_path / name, (1_700_000_000 + 1000 * (len(names) - age),) * 2)
    main_job.prune_logs(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == names[-3:]
