"""The serving contract against a real tritonserver on loopback (the nvidia-pytriton bundle), talked to with
tritonclient: what a client sends and gets back, and the clear refusals. One server for the module (conftest:
``server``, with the bank ``built``); the quick server tests, none of them ``slow``.

The encoder is the tiny random open_clip ViT exported to ONNX (with its text tower, so builds go through
clip_text too); the lot is the synthetic washer lot that the README's main job uses.
"""

import csv
import json
import shutil
import subprocess
import sys
import threading
import time

from pathlib import Path

import numpy as np
import pytest

from conftest import (BANK_STORAGE_TOL, FLOAT16_HALF_ULP, LOT_IMAGE_SIZE as SIZE, assert_maps_within_contract,
                      write_manifest)
from postprocess.decision import OVER_THRESHOLD_NOTE
from serving_helpers import ROOT, ClientError, LocalServer, PAClipClient, free_ports, metrics_text
from postprocess.config import FULL_BANK, PAClipConfig
from postprocess.pipeline import LotScorer

SLOW_BUILD_LOTS = 10  # copies of the 24-image lot: a build of about 5 s here, the checks during it take under 1 s
# built as the full bank (FULL_BANK: every lot image read, every channel): issue 26's default bank builds that lot
# too fast

pytestmark = pytest.mark.server


@pytest.mark.parametrize("protocol,shm", [("http", False), ("grpc", False), ("http", True), ("grpc", True)])
def test_ensemble_matches_in_process_pipeline(server, repository, built, lot, protocol, shm):
    from export.backbones import OnnxBackbone

    url = server.http_url if protocol == "http" else server.grpc_url
    client = PAClipClient(url, protocol, shared_memory=shm)
    maps, scores = [], []
    for start in range(0, len(lot), 5):
        m, s = client.score(lot[start:start + 5], "washer")
        maps.append(m)
        scores.append(s)
    client.close()
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    expected = LotScorer(OnnxBackbone.from_repository(repository), lot, "washer", progress=False).score(PAClipConfig())
    assert built["normal_selection"] == "text"  # prompts went through clip_text
    assert maps.shape == (len(lot), SIZE, SIZE)
    assert_maps_within_contract(maps, expected.maps)
    assert np.abs(scores - expected.scores).max() < BANK_STORAGE_TOL


def test_bank_list_info_delete(server, built, lot):
    client = PAClipClient(server.grpc_url, "grpc")
    client.add_images("scratchpad", "washer", lot[:4], reset=True)
    client.build_bank("scratchpad", {"mode": "mutual"})
    assert {"washer", "scratchpad"} <= {b["bank"] for b in client.list_banks()}
    info = client.bank_info("scratchpad")
    assert info["n_images"] == 4 and info["config"]["use_normal_bank"] is False
    assert info["encoder"]["backbone"] == "tiny"
    client.delete_bank("scratchpad")
    with pytest.raises(ClientError, match="unknown bank 'scratchpad'"):
        client.bank_info("scratchpad")
    client.close()


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, repository, built, lot):
    import tritonclient.http as httpclient

    client = PAClipClient(server.http_url)
    raw = httpclient.InferenceServerClient(server.http_url)

    def ensemble(images, bank="washer", dtype="UINT8"):
        i = httpclient.InferInput("images", list(images.shape), dtype)
        i.set_data_from_numpy(images)
        b = httpclient.InferInput("bank", [len(images), 1], "BYTES")
        b.set_data_from_numpy(np.array([[bank.encode()]] * len(images), dtype=np.object_))
        return raw.infer("pa_clip", [i, b])

    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="FP32|UINT8|data-type|datatype"):
        ensemble(lot[:1].astype(np.float32), dtype="FP32")
    with pytest.raises(InferenceServerException, match=r"Expected \[-1,112,112,3\], got \[1,50,50,3\]"):
        ensemble(lot[:1, :50, :50].copy())
    image = httpclient.InferInput("images", [1, SIZE, SIZE, 3], "UINT8")
    image.set_data_from_numpy(lot[:1])
    bad_id = httpclient.InferInput("bank", [1, 1], "BYTES")
    bad_id.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="input 'bank' must be UTF-8 text"):
        raw.infer("pa_clip", [image, bad_id])
    extra = httpclient.InferInput("extra", [1, 1], "FP32")
    extra.set_data_from_numpy(np.zeros((1, 1), np.float32))
    good_id = httpclient.InferInput("bank", [1, 1], "BYTES")
    good_id.set_data_from_numpy(np.array([[b"washer"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="expected 2 inputs but got 3"):
        raw.infer("pa_clip", [image, good_id, extra])
    with pytest.raises(ClientError, match="unknown bank 'no-such-bank'; banks on this server: washer"):
        client.score(lot[:1], "no-such-bank")
    with pytest.raises(ClientError, match="invalid bank id"):
        client.score(lot[:1], "../washer")
    with pytest.raises(ClientError, match="no images to build from"):
        client.build_bank("empty-lot")
    with pytest.raises(ClientError, match="add needs at least one image"):
        client.add_images("empty-lot", "washer", lot[:0])
    with pytest.raises(ClientError, match="at least 2 images"):
        client.add_images("one-image", "washer", lot[:1], reset=True)
        client.build_bank("one-image")
    # a client run whose build is refused gives its lot session back (it stayed a day, and no later run freed it)
    with pytest.raises(ClientError, match="unknown PA-CLIP settings"):
        with client.lot_session("refused") as session:
            client.add_images("refused", "washer", lot[:3], reset=True, lot=session)
            assert [p["lot"] for p in client.store()["pending"] if p["bank"] == "refused"] == [session]
            client.build_bank("refused", {"alphaa": 1}, lot=session)
    assert not [p for p in client.store()["pending"] if p["bank"] == "refused"]
    with pytest.raises(ClientError, match="discard takes one option, 'lot'"):
        client.bank_action("discard", "refused")
    with pytest.raises(ClientError, match="resized to 112x112"):
        client.add_images("washer2", "washer", np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ClientError, match="unknown action"):
        client.bank_action("compact", "washer")
    # pa_clip_score is reachable on its own: what it is sent is checked against the contract and the bank
    from export.backbones import OnnxBackbone

    features = OnnxBackbone.from_repository(repository).encode(lot[:1])

    def scorer(**override):
        tensors = {**features.outputs(), "images": lot[:1], **override}
        inputs = []
        for name, array in tensors.items():
            tensor = httpclient.InferInput(name, list(array.shape), {np.float16: "FP16", np.float32: "FP32",
                                                                     np.uint8: "UINT8"}[array.dtype.type])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        b = httpclient.InferInput("bank", [1, 1], "BYTES")
        b.set_data_from_numpy(np.array([[b"washer"]], dtype=np.object_))
        return raw.infer("pa_clip_score", inputs + [b])

    nan_tokens = features.layer_tokens.copy()
    nan_tokens[..., 0] = np.nan
    with pytest.raises(InferenceServerException, match="'layer_tokens' holds NaN or infinite values"):
        scorer(layer_tokens=nan_tokens)
    with pytest.raises(InferenceServerException, match="must hold 4 layers"):
        scorer(layer_tokens=features.layer_tokens[:, :2].copy())
    with pytest.raises(InferenceServerException, match="scores 112x112 images"):
        scorer(images=np.zeros((1, 32, 32, 3), np.uint8))  # (the guard refuses sides under the encoder's patch)
    assert scorer().as_numpy("anomaly_map").shape == (1, SIZE, SIZE)
    # a scoring call over gRPC keeps the client's timeout (it had no deadline: a stuck server held a run for ever),
    # with shared memory too
    for shared in (False, True):
        hurried = PAClipClient(server.grpc_url, "grpc", timeout_s=0.001, shared_memory=shared)
        with pytest.raises(ClientError, match="Deadline"):
            hurried.score(lot[:2], "washer")
        hurried.close()
    # the other protocol's port: a server answers there, and the error says which protocol it speaks (it said "no
    # Triton server answers ... Start one")
    from client.triton_client import ServerUnreachable

    for url, protocol, other in ((server.http_url, "grpc", "http"), (server.grpc_url, "http", "grpc")):
        crossed = PAClipClient(url, protocol, timeout_s=30)
        with pytest.raises(ServerUnreachable, match=f"A server there speaks {other}: pass --protocol {other}"):
            crossed.check_ready()
        crossed.close()
    # still serving, and the bank is untouched
    maps, scores = client.score(lot[:2], "washer")
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(scores).all()
    assert client.bank_info("washer")["version"] == built["version"]
    raw.close()
    client.close()


def test_four_concurrent_clients_get_correct_results(server, built, lot):
    reference = PAClipClient(server.http_url)
    expected_maps, expected_scores = zip(*(reference.score(lot[i:i + 1], "washer") for i in range(len(lot))))
    reference.close()
    expected_maps, expected_scores = np.concatenate(expected_maps), np.concatenate(expected_scores)
    results, errors = {}, []

    def worker(k):
        try:
            protocol = "http" if k % 2 == 0 else "grpc"
            client = PAClipClient(server.http_url if protocol == "http" else server.grpc_url, protocol)
            for _ in range(2):
                for i in range(k, len(lot), 4):
                    m, s = client.score(lot[i:i + 1], "washer")
                    results[(k, i)] = (m[0], s[0])
            client.close()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == len(lot)
    for (_, i), (m, s) in results.items():
        # the same bank on the same server: batched with other requests or not, the float32 results differ in the
        # last bits only, so the float16 maps by at most one unit in the last place
        assert (np.abs(m - expected_maps[i]) <= np.abs(expected_maps[i]) * 2 * FLOAT16_HALF_ULP + 1e-6).all()
        assert abs(s - expected_scores[i]) < 1e-6


def test_infer_cli_writes_scores_overlays_and_skips_corrupt_images(server, built, lot_dir, workdir):
    images = workdir / "cli_images"
    images.mkdir()
    for p in sorted(lot_dir.glob("*.png"))[:4]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = workdir / "cli_out"
    proc = subprocess.run([sys.executable, "client/infer.py", "--url", server.grpc_url, "--protocol", "grpc",
                           "--images", str(images), "--bank", "washer", "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable image(s)" in proc.stderr
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [r["rank"] for r in table] == ["1", "2", "3", "4", ""] and table[-1]["decision"] == "skipped"
    assert table[-1]["path"].endswith("broken.png") and table[-1]["note"]
    scores = [float(r["score"]) for r in table[:4]]
    assert scores == sorted(scores, reverse=True)  # worst first
    report = json.loads((out / "results.json").read_text())
    threshold = report["decision"]["threshold"]  # the bank's automatic threshold, at its 1% false-alarm budget
    assert report["decision"]["threshold_source"] == "auto" and report["decision"]["false_alarm_rate"] == 0.01
    for row in table[:4]:  # no --threshold: above the bank's automatic threshold is anomalous, calibrated > 0.5
        assert row["decision"] == ("anomalous" if float(row["score"]) > threshold else "normal"), row
        assert (float(row["calibrated"]) > 0.5) == (row["decision"] == "anomalous"), row
        assert (row["width"], row["height"]) == ("128", "128")
    assert report["skipped"][0]["path"].endswith("broken.png") and report["scored"] == 4
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert report["product"]["name"] == "pa-clip-triton" and report["product"]["version"] != "unknown"
    assert report["bank_version"] == report["bank"]["version"] and "--bank" in report["command"]
    # without a server: a clear error and exit status 3 (the previous results stay: nothing answered)
    (port,) = free_ports(1)
    proc = subprocess.run([sys.executable, "client/infer.py", "--url", f"127.0.0.1:{port}", "--images", str(images),
                           "--bank", "washer", "--out", str(out), "--overwrite"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 3 and "no Triton server answers" in proc.stderr
    assert (out / "results.csv").exists()


def test_exit_statuses_and_outputs_a_script_can_trust(server, built, lot_dir, workdir):
    """pa-clip score: 4 when the server refuses (an unknown bank), 1 with --fail-on when a part is decided so, 2 for
    an --out holding another run; --overwrite leaves none of the old run's overlays behind."""
    images = workdir / "exit_images"
    images.mkdir()
    for p in sorted(lot_dir.glob("*.png"))[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    out = workdir / "exit_out"

    def score(*extra):
        return subprocess.run([sys.executable, "-m", "cli", "score", "--url", server.http_url, "--images", str(images),
                               "--out", str(out), "--quiet", *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    refused = score("--bank", "no_such_bank")
    assert refused.returncode == 4 and "no_such_bank" in refused.stderr
    first = score("--bank", "washer", "--threshold", "0.001", "--fail-on", "anomalous")  # everything is anomalous
    assert first.returncode == 1 and "--fail-on anomalous: 3 image(s)" in first.stderr, first.stderr
    stale = out / "overlays" / "from_another_lot.png"
    stale.write_bytes(b"old")
    again = score("--bank", "washer")
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    replaced = score("--bank", "washer", "--overwrite", "--fail-on", "out_of_distribution")
    assert replaced.returncode == 0, replaced.stderr
    assert not stale.exists() and len(list((out / "overlays").glob("*.png"))) == 3
    # a part whose image cannot be read was not shown to be good: --fail-on fails the run (it passed)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    unread = score("--bank", "washer", "--overwrite", "--threshold", "0.999", "--fail-on", "anomalous")
    assert unread.returncode == 1 and "1 image(s) not decided" in unread.stderr, unread.stderr
    assert score("--bank", "washer", "--overwrite", "--threshold", "0.999").returncode == 0  # without: a warning
    (images / "broken.png").unlink()
    # an --out inside --images, run again: its own overlays are not scored as parts
    for _ in range(2):
        inside = subprocess.run([sys.executable, "-m", "cli", "score", "--url", server.http_url, "--images",
                                 str(images), "--out", str(images / "results"), "--quiet", "--overwrite", "--bank",
                                 "washer"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert inside.returncode == 0 and "scored 3 images" in inside.stderr, inside.stderr


def test_every_image_gets_its_own_overlay_and_a_users_folders_stay(server, built, lot_dir, workdir):
    """Outputs a reviewer found wrong, each through a real server: x.png.png beside x.png (and two links to files of
    one name) wrote one overlay for two images, the normal one showing the anomalous one's outline; --out that is the
    image folder left its 'maps' parts unscored and --overwrite removed them; a name too long for an overlay ended
    the run with nothing written; an --out that cannot be written failed after the work was done."""
    sources = sorted(lot_dir.glob("*.png"))
    images, store = workdir / "names_images", workdir / "names_store"
    for folder in (images / "maps", images / "line1", images / "line2", store / "cam1", store / "cam2"):
        folder.mkdir(parents=True)
    copy = lambda source, target: target.write_bytes(source.read_bytes())  # noqa: E731
    copy(sources[0], images / "x.png")
    copy(sources[1], images / "x.png.png")
    copy(sources[8], images / "x.jpg")  # x.png and x.jpg keep their suffixes: x.png.png, taken twice
    copy(sources[2], images / "maps" / "part.png")  # the user's parts, in a folder named like a run's maps
    copy(sources[3], images / "=HYPERLINK(1).png")
    long_name = "p" * 250
    copy(sources[4], images / f"{long_name}.png")
    copy(sources[5], images / f"{long_name}.jpg")  # stems taken: overlays "<name>.png.png", over 255 bytes
    for camera, source in (("cam1", sources[6]), ("cam2", sources[7])):
        copy(source, store / camera / "same.png")
    (images / "line1" / "same.png").symlink_to(store / "cam1" / "same.png")
    (images / "line2" / "same.png").symlink_to(store / "cam2" / "same.png")

    def score(*extra, url=server.http_url):
        return subprocess.run([sys.executable, "-m", "cli", "score", "--url", url, "--images", str(images),
                               "--bank", "washer", "--quiet", *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    refused = score("--out", str(images), "--save-maps", "--overwrite")  # it would write into the user's maps
    assert refused.returncode == 2 and "no scoring run wrote" in refused.stderr, refused.stderr
    unwritable = score("--out", str(images / "x.png" / "out"), url="127.0.0.1:9")  # refused before the server
    assert unwritable.returncode == 2 and "cannot be written" in unwritable.stderr, unwritable.stderr
    run = score("--out", str(images))
    assert run.returncode == 0, run.stderr
    assert (images / "maps" / "part.png").exists()
    rows = list(csv.DictReader(open(images / "results.csv")))
    assert len(rows) == 9, [r["path"] for r in rows]  # the maps folder's part scored too
    overlays = [r["overlay"] for r in rows if r["overlay"]]
    # relative to --out: the folder can be moved (they were relative to where the run started)
    assert len(overlays) == len(set(overlays)) == 7 and all(o.startswith("overlays/") and (images / o).is_file()
                                                            for o in overlays), overlays
    too_long = [r for r in rows if long_name in r["path"]]
    assert all(r["overlay"] == "" and "not written" in r["note"] for r in too_long), too_long
    again = score("--out", str(images), "--overwrite")  # now a run's: its overlays replaced, the user's maps kept
    assert again.returncode == 0 and (images / "maps" / "part.png").exists(), again.stderr
    assert len(list(csv.DictReader(open(images / "results.csv")))) == 9


def test_a_run_with_odd_names_a_key_or_an_interruption_leaves_outputs_a_line_can_use(server, built, lot_dir, workdir,
                                                                                    monkeypatch, capsys):
    """From a review of the command line, each through a real server: a file name whose bytes are not UTF-8 ended
    the run after every image was scored, with no results written; a run interrupted after its first overlay left
    an --out that --overwrite could not replace and whose overlays a later run read as parts; the access key was
    written into results.json; a file named with glob's characters was 'not an image file'; a newline in a name
    drew over the overlay's decision."""
    import os

    import client.infer as infer
    from cli import main as cli

    sources = sorted(lot_dir.glob("*.png"))
    images = workdir / "odd_names"
    images.mkdir()
    odd = [os.fsdecode(b"caf\xe9.png"), "new\nline.png", "part[1].png"]
    for source, name in zip(sources, odd):
        (images / name).write_bytes(source.read_bytes())
    out = workdir / "odd_out"
    argv = ["score", "--url", server.http_url, "--images", str(images), "--bank", "washer", "--out", str(out),
            "--quiet", "--concurrency", "1", "--batch-size", "1"]

    drawn = []
    real_save_panel = infer.save_panel

    def interrupted_after_the_first(*args, **kwargs):  # Ctrl-C while the second overlay is drawn
        if drawn:
            raise KeyboardInterrupt
        drawn.append(real_save_panel(*args, **kwargs))

    monkeypatch.setattr(infer, "save_panel", interrupted_after_the_first)
    assert cli.main(argv) == 130
    assert len(list((out / "overlays").glob("*.png"))) == 1
    # the part scored before Ctrl-C keeps its result (it was dropped, its overlay kept), the others say why they have
    # none, and the run is marked incomplete
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["complete"] is False and interrupted["interrupted"] is True and interrupted["scored"] == 1
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["decision"] for r in rows] in (["normal", "failed", "failed"], ["anomalous", "failed", "failed"])
    assert rows[0]["overlay"] and all(r["note"] == "not scored: the run was interrupted" for r in rows[1:])
    assert "1 of 3 images were scored" in capsys.readouterr().err
    assert infer.part_images(str(out)) == []  # a run's pictures, never parts
    monkeypatch.setattr(infer, "save_panel", real_save_panel)
    capsys.readouterr()
    assert cli.main([*argv, "--overwrite", "--key", "s3cret-line-key"]) == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] is True and report["scored"] == 3
    assert "s3cret" not in (out / "results.json").read_text() and "***" in report["command"]
    paths = {Path(r["path"]).name for r in csv.DictReader(open(out / "results.csv", encoding="utf-8"))}
    assert paths == {"caf\\xe9.png", "new\nline.png", "part[1].png"}, paths
    assert "caf\\xe9.png" in (out / "report.html").read_text(encoding="utf-8")
    one = subprocess.run([sys.executable, "-m", "cli", "score", "--url", server.http_url, "--images",
                          str(images / "part[1].png"), "--bank", "washer", "--out", str(workdir / "one_out"),
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and "scored 1 images" in one.stderr, one.stderr
    # the server lost after the first batch (its guard's 502, or the connection itself): 3, as the README says, which
    # a line script retries (it was 1, "some images failed")
    from tritonclient.utils import InferenceServerException

    from client import exits
    from client.triton_client import client_error

    for lost in (InferenceServerException("the inference server closed the connection without an answer", "502"),
                 ConnectionResetError(104, "Connection reset by peer")):
        batches = []
        real_score = infer.PAClipClient.score

        def lost_after_the_first(self, *args, **kwargs):
            batches.append(1)
            if len(batches) > 1:
                raise client_error(lost)
            return real_score(self, *args, **kwargs)

        monkeypatch.setattr(infer.PAClipClient, "score", lost_after_the_first)
        assert cli.main([*argv, "--overwrite"]) == exits.UNREACHABLE
        assert json.loads((out / "results.json").read_text())["failed"][0]["unreachable"] is True
        monkeypatch.setattr(infer.PAClipClient, "score", real_score)


def test_banks_command_lists_shows_deletes_and_prunes(server, built, lot, repository, workdir):
    def banks(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "client.banks", "--url", server.http_url, *args], cwd=ROOT,
                              capture_output=True, text=True, input=stdin, timeout=120)

    client = PAClipClient(server.http_url)
    client.add_images("scratch", "washer", lot[:4], reset=True)
    client.build_bank("scratch", {"mode": "mutual"})
    client.score(lot[4:7], "scratch")  # 3 new parts: a window too small for an alarm (it said "steady")
    shown = banks("info", "scratch").stdout
    assert "scored lately     3 new images" in shown and "too few for an alarm yet (3 of 32)" in shown, shown
    # a version replaced a moment ago: prune keeps it (a replica may still load it) and says so (it said only
    # "removed 0 item(s)")
    client.add_images("scratch", "washer", lot[:4], reset=True)
    client.build_bank("scratch", {"mode": "mutual"})
    client.close()
    kept = banks("prune")
    assert kept.returncode == 0 and "version(s) written less than 10 minutes ago" in kept.stdout, kept
    assert "/scratch/v-" in kept.stdout.split("kept ")[1]  # other tests' banks may have one too
    listed = banks("list")
    assert listed.returncode == 0, listed.stderr
    assert "in the store" in listed.stdout and "scratch" in listed.stdout and "washer" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith("scratch "))
    assert f"{SIZE}x{SIZE}" in row and " MB" in row and "washer" in row
    info = banks("info", "scratch")
    assert info.returncode == 0 and "(live)" in info.stdout and "threshold" in info.stdout, info.stdout
    assert json.loads(banks("--json", "info", "scratch").stdout)["n_images"] == 4
    # no terminal to ask at (a script's pipe): refused with what to pass, nothing deleted (input() raised a traceback
    # on a closed stdin, and its prompt went to stdout, into --json's output)
    unasked = banks("delete", "scratch", stdin="y\n")
    assert unasked.returncode == 2 and "pass --yes" in unasked.stderr and not unasked.stdout, unasked
    assert "scratch" in banks("list").stdout
    unknown = banks("verify", "no_such_bank")  # not there is a refusal (4), not damage (1)
    assert unknown.returncode == 4 and "unknown bank 'no_such_bank'" in unknown.stderr, unknown
    deleted = banks("delete", "scratch", "--yes")
    assert deleted.returncode == 0 and "deleted bank 'scratch'" in deleted.stdout
    assert "scratch" not in banks("list").stdout
    pruned = banks("prune")
    assert pruned.returncode == 0 and "freed" in pruned.stdout
    missing = banks("info", "scratch")
    assert missing.returncode == 4 and "unknown bank 'scratch'" in missing.stderr
    # a store limit: an add past it is refused with what to do, and the server keeps serving
    http, grpc, metrics = free_ports(3)
    small = LocalServer(repository, workdir / "banks_small", http_port=http, grpc_port=grpc, metrics_port=metrics,
                        max_store_gb=0.001).start(timeout=180)
    try:
        client = PAClipClient(small.http_url)
        client.add_images("a", "washer", lot[:2], reset=True)  # about 0.1 MB: fits
        with pytest.raises(ClientError, match="keeps at most 1.0 MB"):
            client.add_images("a", "washer", np.repeat(lot, 10, axis=0))
        assert client.list_banks() == []
        client.close()
    finally:
        small.stop()


def test_a_bank_grows_with_new_parts_through_the_server(server, lot, lot_dir, workdir):
    """python -m client.banks update: the new parts go in as the bank's pending lot, those like its good parts are
    folded into a new version (the others listed), the lot is cleared; the grown bank serves at once."""
    client = PAClipClient(server.http_url)
    client.add_images("grow", "washer", lot[:6], reset=True)
    with pytest.raises(ClientError, match="bad build option false_alarm_rate: the false-alarm rate must be"):
        client.build_bank("grow", {"false_alarm_rate": 0.7})
    client.build_bank("grow", {"false_alarm_rate": 0.05})  # the budget the bank keeps, through its updates too
    before = client.bank_info("grow")
    assert before["decision"]["false_alarm_rate"] == 0.05
    new = workdir / "new_parts"
    new.mkdir()
    for path in sorted(lot_dir.glob("*.png"))[6:]:
        shutil.copy(path, new / path.name)

    def banks(*args):
        return subprocess.run([sys.executable, "-m", "client.banks", "--url", server.http_url, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    # another client meanwhile starts a lot of this bank id over: the update's own lot session is apart from it
    other = client.new_lot()
    client.add_images("grow", "washer", lot[:2], reset=True, lot=other)
    client.add_images("grow", "washer", lot[2:3], reset=True)
    grown = banks("--json", "update", "grow", "--images", str(new), "--quiet")
    assert grown.returncode == 0, grown.stderr
    answer = json.loads(grown.stdout)
    report = answer["update"]
    assert report["scored"] == 4 and report["folded_in"] + len(report["left_out"]) == 4
    after = client.bank_info("grow")
    assert after["n_images"] == 6 + report["folded_in"]
    assert report["written"] and after["version"] != before["version"]  # 4 new parts counted: a new version
    assert after["decision"]["n_images"] == before["decision"]["n_images"] + 4
    assert after["decision"]["false_alarm_rate"] == 0.05
    # the lot it read is cleared, the other client's lots are as they were
    assert sorted((p["lot"] or "", p["images"]) for p in client.store()["pending"] if p["bank"] == "grow") == \
        sorted([("", 1), (other, 2)])
    maps, scores = client.score(lot[6:], "grow")
    assert np.isfinite(scores).all() and maps.shape == (4, SIZE, SIZE)
    # the same parts again: those folded in are lot members now, the others were counted: nothing is written
    again = json.loads(banks("--json", "update", "grow", "--images", str(new), "--quiet").stdout)["update"]
    assert again["already_in_lot"] == report["folded_in"] and again["already_counted"] == len(report["left_out"])
    assert not again["written"] and client.bank_info("grow")["version"] == after["version"]
    printed = banks("update", "grow", "--images", str(new), "--quiet")
    assert "already in its lot" in printed.stdout and "(nothing written)" in printed.stdout
    with pytest.raises(ClientError, match="update takes no options"):
        client.bank_action("update", "grow", options={"alpha": 0.5})
    missing = banks("update", "nope", "--images", str(new))
    assert missing.returncode == 4 and "unknown bank 'nope'" in missing.stderr
    client.delete_bank("grow")
    client.close()


def test_a_damaged_bank_is_refused_through_the_server_naming_it_and_verify_finds_it(server, built, lot, lot_dir,
                                                                                     workdir):
    """The probe's worst find: 64 bytes flipped in a version's bank.safetensors moved maps by up to 9.1, silently.
    Now the scoring model refuses the bank when it loads it (400: the message names it and what to do), verify
    finds it, and the other banks serve. A scoring run against it is refused as a whole: status 4 and one line
    (it was 1, "N image(s) failed", a Python warning per batch, and the previous run's results removed)."""
    def verify(*bank):
        return subprocess.run([sys.executable, "-m", "client.banks", "--url", server.http_url, "verify", *bank],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    def score(bank, *extra):
        return subprocess.run([sys.executable, "-m", "cli", "score", "--url", server.http_url, "--images",
                               str(lot_dir), "--bank", bank, "--out", str(workdir / "damaged_out"), "--quiet",
                               "--batch-size", "2", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)

    store = workdir / "banks"
    shutil.copytree(store / "washer", store / "washer_copy")
    live = store / "washer_copy" / (store / "washer_copy" / "CURRENT").read_text().strip()
    manifest = json.loads((live / "manifest.json").read_text())
    write_manifest(live / "manifest.json", json.dumps({**manifest, "bank": "washer_copy"}, indent=1))
    try:
        intact = verify("washer_copy")
        assert intact.returncode == 0 and "ok: manifest, digests and tensors" in intact.stdout, intact.stdout + intact.stderr
        assert score("washer").returncode == 0  # a previous run's results in --out (the copy not loaded yet)
        before = (workdir / "damaged_out" / "results.csv").read_bytes()
        data = bytearray((live / "bank.safetensors").read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        (live / "bank.safetensors").write_bytes(bytes(data))
        checked = verify()
        assert checked.returncode == 1, checked.stdout + checked.stderr
        assert "washer_copy" in checked.stdout and "DAMAGED" in checked.stdout and "digest differs" in checked.stdout
        assert any(line.startswith("washer ") and " ok: manifest, digests and tensors" in line
                   for line in checked.stdout.splitlines()), checked.stdout
        client = PAClipClient(server.http_url)
        with pytest.raises(ClientError, match="bank 'washer_copy' version v-.* is damaged \\(bank.safetensors "
                                              "digest differs\\): rebuild it"):
            client.score(lot[:1], "washer_copy")
        client.score(lot[:1], "washer")  # the others still serve
        client.close()
        refused = score("washer_copy", "--overwrite")
        assert refused.returncode == 4, refused.stderr
        assert "error: the server refused to score against bank 'washer_copy'" in refused.stderr
        assert refused.stderr.count("is damaged") <= 2 and "Warning" not in refused.stderr, refused.stderr
        assert (workdir / "damaged_out" / "results.csv").read_bytes() == before  # a refused run loses nothing
    finally:
        shutil.rmtree(store / "washer_copy", ignore_errors=True)


def test_a_rebuilt_bank_is_served_at_once_and_a_deleted_one_is_refused(server, repository, lot):
    from export.backbones import OnnxBackbone

    client = PAClipClient(server.http_url)
    client.add_images("live", "washer", lot, reset=True)
    client.build_bank("live", {"mode": "mutual"})
    mutual_maps, _ = client.score(lot[:3], "live")  # loads and caches the first version
    client.add_images("live", "washer", lot, reset=True)
    client.build_bank("live", {"mode": "pad_mpam"})
    maps, scores = client.score(lot[:3], "live")
    expected = LotScorer(OnnxBackbone.from_repository(repository), lot, "washer", progress=False).score(PAClipConfig())
    assert_maps_within_contract(maps, expected.maps[:3])
    assert np.abs(maps - mutual_maps).max() > 1e-3  # the two versions do differ
    client.delete_bank("live")
    with pytest.raises(ClientError, match="unknown bank 'live'"):
        client.score(lot[:1], "live")
    client.close()


def test_one_banks_build_holds_up_no_other_bank(server, built, lot, workdir):
    """Issue 25: a scoring run (infer.py asks info first) waited behind another bank's build. Now, while one bank
    builds, the other bank instance answers info, list and adds, scoring goes on, a second build gets "server
    busy" (503) at once, and a client that waits has its build done after the first."""
    rng = np.random.default_rng(5)
    slow = np.concatenate([np.clip(lot.astype(np.int16) + rng.integers(-12, 13, lot.shape), 0, 255).astype(np.uint8)
                           for _ in range(SLOW_BUILD_LOTS)])  # a lot big enough that its build takes seconds
    with PAClipClient(server.http_url) as client:
        for start in range(0, len(slow), 32):
            client.add_images("slow_build", "washer", slow[start:start + 32], reset=start == 0)
    lock = workdir / "banks" / "slow_build" / ".build-lock"
    results, waits = {}, []

    def build(bank, **kwargs):
        with PAClipClient(server.grpc_url, "grpc") as client:  # gRPC: thread-safe, unlike the gevent HTTP client
            try:
                results[bank] = client.build_bank(bank, **kwargs)
            except ClientError as err:
                results[bank] = err

    first = threading.Thread(target=build, args=("slow_build",), kwargs={"options": FULL_BANK})
    first.start()
    deadline = time.monotonic() + 60
    while not lock.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.exists(), f"the build of slow_build never took its lock: {results}"
    with PAClipClient(server.http_url) as client:
        info = client.bank_info("washer")
        maps, scores = client.score(lot[:2], "washer")
        listed = {b["bank"] for b in client.list_banks()}
        assert lock.exists() and first.is_alive(), "info, scoring and list waited for another bank's build to end"
        client.add_images("queued", "washer", lot[:6], reset=True)
        with pytest.raises(ClientError, match="is being built right now"):
            client.add_images("slow_build", "washer", lot[:1])
        with pytest.raises(ClientError, match="server busy: this host is building bank 'slow_build'") as busy:
            client.build_bank("queued", wait_s=0)
        assert busy.value.__cause__.status() == "503"
        second = threading.Thread(target=build, args=("queued",), kwargs={"on_wait": waits.append})
        second.start()
        time.sleep(0.5)  # its first try, refused while slow_build builds
        assert lock.exists() and first.is_alive(), "the build of slow_build ended too soon to tell: make it longer"
    assert info["n_images"] == built["n_images"] and maps.shape[0] == 2 and np.isfinite(scores).all()
    assert "washer" in listed
    first.join(timeout=300)
    second.join(timeout=300)
    assert results["slow_build"]["n_images"] == len(slow), results["slow_build"]
    assert results["queued"]["n_images"] == 6, results["queued"]  # built once the slot was free
    assert len(waits) == 1 and "building bank 'slow_build'" in waits[0]
    with PAClipClient(server.http_url) as client:
        for bank in ("slow_build", "queued"):
            client.delete_bank(bank)


def _post(url: str, model: str, inputs: list) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_our_faults_are_internal_errors_with_a_logged_traceback_and_bad_input_stays_400(server, workdir, lot):
    client = PAClipClient(server.http_url)
    client.add_images("broken", "washer", lot[:4], reset=True)
    client.build_bank("broken", {"mode": "mutual"})
    banks = workdir / "banks"
    # a store in a state the server never leaves it in (its lot folder a plain file): nothing the caller can fix.
    # A damaged bank, by contrast, is refused as damage, a 400 (tests/test_bank_integrity.py)
    (banks / "broken" / "lot").write_text("not a folder")

    def bank_action(action, bank):
        return _post(server.http_url, "pa_clip_bank", [
            {"name": "action", "shape": [1], "datatype": "BYTES", "data": [action]},
            {"name": "bank", "shape": [1], "datatype": "BYTES", "data": [bank]}])

    with pytest.raises(ClientError) as raised:
        client.add_images("broken", "washer", lot[:1])
    client.close()
    assert raised.value.__cause__.status() in ("500", "StatusCode.INTERNAL"), str(raised.value)
    message = str(raised.value)
    incident = message.split("internal error ")[1].split()[0]
    assert len(incident) == 8 and "server log" in message and "FileExistsError" in message
    deadline = time.monotonic() + 30  # the stub's log lines reach the server's log a moment after the answer
    while f"internal error {incident}" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_text()
    at = log.index(f"internal error {incident}")
    assert "Traceback" in log[at:] and "FileExistsError" in log[at:]
    status, body = bank_action("info", "no-such-bank")
    assert status == 400 and "unknown bank 'no-such-bank'" in body["error"]
    status, body = _post(server.http_url, "pa_clip_bank", [
        {"name": "action", "shape": [1], "datatype": "BYTES", "data": ["build"]},
        {"name": "bank", "shape": [1], "datatype": "BYTES", "data": ["washer"]},
        {"name": "options", "shape": [1], "datatype": "BYTES", "data": ["[1,2]"]}])
    assert status == 400 and "must be a JSON object" in body["error"]
    shutil.rmtree(banks / "broken")


def test_prometheus_metrics_include_the_pipelines_own(server, built, lot):
    client = PAClipClient(server.http_url)
    before = _metric_values(server)
    client.score(lot[:2], "washer")
    client.score(lot[2:3], "washer")  # the bank is loaded by now (alone, this test's first request loads it)
    client.close()
    after = _metric_values(server)
    scored = 'pa_clip_images_scored_total{bank="washer"}'
    assert after[scored] - before.get(scored, 0.0) == 3
    assert after['pa_clip_bank_builds_total{bank="washer",outcome="built"}'] >= 1
    assert after["pa_clip_bank_cache_bytes"] > 0 and after["pa_clip_bank_cache_hits_total"] >= 1
    assert after["pa_clip_score_seconds_total"] > before.get("pa_clip_score_seconds_total", 0.0)
    assert any(name.startswith("nv_inference_request_success") for name in after)  # Triton's own, same port


def _metric_values(server) -> dict:
    """name{labels} -> value off the metrics port, read with Prometheus's own parser; the scoring instance's label
    left out (one scoring instance here: two series that differ only in it would be an error)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            labels = sorted((k, v) for k, v in sample.labels.items() if k != "instance")
            key = sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            assert key not in values, f"two series {key}"
            values[key] = sample.value
    return values


def _raw_http(url: str, body: bytes, headers: dict | None = None, path: str = "/v2/models/pa_clip/infer"):
    import http.client

    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_a_brightening_line_raises_the_drift_alarm_on_the_metrics_port_and_in_info(server, lot, workdir):
    """Two banks of the same lot; one scores new washers as they come, the other the same washers growing brighter
    image by image: only the second's drift alarm is raised, on /metrics and in python -m client.banks info; a black
    frame scored by the client is decided out_of_distribution in results.csv."""
    from client.demo_lot import write_demo_lot
    from client.infer import load_image

    folder = write_demo_lot(workdir / "drift_parts", n_images=48, n_defective=0, size=128, seed=11)
    fresh = np.stack([load_image(p, SIZE)[1] for p in sorted(folder.glob("*.png"))])
    gain = np.linspace(1.0, 1.8, len(fresh))[:, None, None, None]
    brighter = np.clip(fresh.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    client = PAClipClient(server.http_url)
    for bank, images in (("steady", fresh), ("brighter", brighter)):
        client.add_images(bank, "washer", lot, reset=True)
        client.build_bank(bank)
        for start in range(0, len(images), 8):
            client.score(images[start:start + 8], bank)
    values = _metric_values(server)
    assert values['pa_clip_bank_drift_alarm{bank="brighter"}'] == 1.0
    assert values['pa_clip_bank_drift_alarm{bank="steady"}'] == 0.0
    assert values['pa_clip_bank_drift{bank="brighter"}'] > values['pa_clip_bank_drift{bank="steady"}']
    assert 'pa_clip_bank_score_quantile{bank="steady",q="0.99"}' in values
    info = subprocess.run([sys.executable, "-m", "client.banks", "--url", server.http_url, "info", "brighter"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "ALARM: the latest parts are unlike the lot" in info.stdout, info.stdout
    assert "out of dist." in info.stdout
    # the scoring run says so where a line looks: the console, results.json, the report page
    from PIL import Image

    batch = workdir / "brighter_batch"
    batch.mkdir()
    for i, image in enumerate(brighter[-2:]):
        Image.fromarray(image).save(batch / f"part_{i}.png")
    run = subprocess.run([sys.executable, "client/infer.py", "--url", server.http_url, "--bank", "brighter",
                          "--images", str(batch), "--out", str(workdir / "brighter_out"), "--quiet",
                          "--no-overlays", "--fail-on", "drift"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert "warning: the bank's drift alarm is up: the last" in run.stderr, run.stderr
    assert run.returncode == 1 and "--fail-on drift: the bank's drift alarm is up" in run.stderr  # a line stops
    said = json.loads((workdir / "brighter_out" / "results.json").read_text())["warnings"]
    assert any(w.startswith("the bank's drift alarm is up") for w in said)
    assert "drift alarm is up" in (workdir / "brighter_out" / "report.html").read_text()
    # the client's decision: a black frame among new washers
    parts = workdir / "with_black"
    parts.mkdir()
    shutil.copy(sorted(folder.glob("*.png"))[0], parts / "good.png")
    Image.new("RGB", (128, 128)).save(parts / "black.png")
    # noise: unlike the lot, and scoring far above the threshold: not passed by --fail-on anomalous (it was)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(parts / "noise.png")
    out = workdir / "black_out"
    run = subprocess.run([sys.executable, "client/infer.py", "--url", server.http_url, "--bank", "steady", "--images",
                          str(parts), "--out", str(out), "--quiet", "--fail-on", "anomalous"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["black.png"]["decision"] == "out_of_distribution" and "camera moved" in rows["black.png"]["note"]
    assert rows["good.png"]["decision"] == "normal"
    assert rows["noise.png"]["decision"] == "out_of_distribution" and OVER_THRESHOLD_NOTE in rows["noise.png"]["note"]
    over = sum(OVER_THRESHOLD_NOTE in r["note"] for r in rows.values())
    assert "2 out of distribution" in run.stderr and f"({over} of them above the threshold too)" in run.stderr
    assert "drift alarm" not in run.stderr  # the steady bank's window: 48 washers and these 3
    # said as what they are: decided out of distribution, failing --fail-on anomalous by their scores (the line said
    # "decided so", which they were not)
    assert run.returncode == 1 and (f"--fail-on anomalous: {over} image(s) out of distribution with a score above "
                                    "the threshold") in run.stderr, run.stderr
    shown = json.loads((out / "results.json").read_text())["images"]
    assert [r["over_threshold"] for r in shown if Path(r["path"]).name == "noise.png"] == [True]
    # a deleted bank's drift gauges leave /metrics (they stayed at their last values while the server ran)
    steady = {k: v for k, v in _metric_values(server).items() if 'bank="steady"' in k}
    client.delete_bank("brighter")
    with pytest.raises(Exception, match="brighter"):
        client.score(fresh[:1], "brighter")
    values = _metric_values(server)
    gauges = ("pa_clip_bank_score_quantile", "pa_clip_bank_ood_rate", "pa_clip_bank_drift", "pa_clip_bank_drift_alarm")
    assert not [name for name in values if name.split("{")[0] in gauges and 'bank="brighter"' in name]
    assert {k: values[k] for k in steady} == steady  # the series that stay keep their values
    # a new version of a bank starts without the old one's window: its gauges leave at its first request (they
    # stood, an alarm included, until a new part came)
    client.add_images("steady", "washer", lot, reset=True)
    client.build_bank("steady")
    client.score(lot[:1], "steady")  # a lot image: not a new part, nothing joins the window
    assert not [name for name in _metric_values(server) if name.split("{")[0] in gauges and 'bank="steady"' in name]
    client.delete_bank("steady")
    client.close()


def test_hostile_http_requests_are_refused_before_triton_allocates(server, built, lot):
    def infer(images_input):
        return json.dumps({"inputs": [images_input, {"name": "bank", "shape": [1, 1], "datatype": "BYTES",
                                                     "data": ["washer"]}]}).encode()

    binary_body = infer({"name": "images", "shape": [1, SIZE, SIZE, 3], "datatype": "UINT8",
                         "parameters": {"binary_data_size": 10}})
    cases = [  # (body, headers, expected status, words of the answer)
        (infer({"name": "images", "shape": [1, 100000, 100000, 3], "datatype": "UINT8", "data": [0] * 10}), {},
         413, "claims shape [1, 100000, 100000, 3]"),  # the 200-byte request that used to abort tritonserver
        (infer({"name": "images", "shape": [1, 20000, 20000, 3], "datatype": "UINT8", "data": [0] * 10}), {},
         413, "at most"),
        (infer({"name": "images", "shape": [1, SIZE, SIZE, 3], "datatype": "UINT8", "data": [0] * 10}), {},
         400, "but carries 10"),
        (b'{"inputs": [ {"name": "images"', {}, 400, "not valid JSON"),
        (binary_body, {"Inference-Header-Content-Length": str(len(binary_body))}, 400, "more than the request carries"),
        (binary_body + bytes(10), {"Inference-Header-Content-Length": str(len(binary_body))}, 400,
         f"({SIZE * SIZE * 3} bytes) but carries 10 bytes"),
        (infer({"name": "images", "shape": [-1, SIZE, SIZE, 3], "datatype": "UINT8", "data": [0]}), {}, 400,
         "non-negative integers"),
    ]
    for body, headers, status, words in cases:
        got, answer = _raw_http(server.http_url, body, headers)
        assert got == status and words in answer, (got, answer)
        assert server.ready()
    # a body announced bigger than the limit is refused before it is read; a chunked one is refused
    import socket as socket_module

    host, port = server.http_url.split(":")
    for head, status in ((f"Content-Length: {1 << 40}\r\n", b"413"), ("Transfer-Encoding: chunked\r\n", b"411")):
        with socket_module.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /v2/models/pa_clip/infer HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            assert s.recv(4096).split(b" ")[1] == status
    assert server.process.poll() is None and server.ready()
    client = PAClipClient(server.http_url)
    maps, _ = client.score(lot[:1], "washer")
    client.close()
    assert maps.shape == (1, SIZE, SIZE)



@pytest.mark.skipif(not __import__("postprocess.kernels", fromlist=["x"]).bfloat16_available(),
                    reason="torch with oneDNN bfloat16 is not installed here")
def test_a_server_set_to_bfloat16_products_scores_the_same_bank_within_their_rounding(server, repository, built,
                                                                                      lot, workdir):
    """``cpu_matmul: bfloat16`` in pa_clip_score's config.pbtxt reaches the served scoring: the same bank, read by a
    second server from the same store, scores the lot within bfloat16's rounding of the float32 server, not equal."""
    from export.triton_config import read_config, write_config
    from serving_helpers import start_server

    repo = workdir / "bf16_repository"
    shutil.copytree(repository, repo)
    config = read_config(repo / "pa_clip_score")
    config.parameters["cpu_matmul"].string_value = "bfloat16"
    write_config(repo / "pa_clip_score", config)
    exact = PAClipClient(server.http_url)
    expected_maps, expected = exact.score(lot[:6], "washer")
    exact.close()
    bf16 = start_server(repo, workdir / "banks", workdir / "bf16_server.log")
    try:
        client = PAClipClient(bf16.http_url)
        maps, scores = client.score(lot[:6], "washer")
        client.close()
    finally:
        bf16.stop()
    assert 0 < np.abs(maps.astype(np.float64) - expected_maps).max() < 2e-2
    assert np.abs(scores - expected).max() < 1e-2
