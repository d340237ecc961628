"""What the metrics port exposes is Prometheus text that a kept parser reads, and it says what telemetry.METRICS and
the README say; a deleted bank's gauges go without harming the server, also with two scoring instances."""

import re
import shutil
import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import LOT_IMAGE_SIZE as SIZE
from postprocess.telemetry import METRICS
from serving_helpers import PAClipClient, metrics_text, start_server

pytestmark = pytest.mark.server


def test_the_metrics_port_is_prometheus_text_with_the_documented_series(server, built, lot):
    parser = pytest.importorskip("prometheus_client.parser")
    client = PAClipClient(server.http_url)
    rng = np.random.default_rng(3)
    new = np.clip(lot[:4].astype(int) + rng.integers(-3, 4, lot[:4].shape), 0, 255).astype(np.uint8)
    client.score(np.concatenate([new, np.zeros((1, SIZE, SIZE, 3), np.uint8)]), "washer")  # a black frame too
    with pytest.raises(Exception):
        client.build_bank("made-up-id")
    first = metrics_text(server)
    client.score(lot[:2], "washer")
    second = metrics_text(server)
    client.close()
    families = {f.name: f for f in parser.text_string_to_metric_families(first)}  # raises on text it cannot read
    lines = first.splitlines()
    for kind in ("HELP", "TYPE"):
        said = Counter(line.split()[2] for line in lines if line.startswith(f"# {kind} "))
        assert not [name for name, n in said.items() if n > 1], f"a family with two {kind} lines"
    series = Counter(line.rpartition(" ")[0] for line in lines if line and not line.startswith("#"))
    assert not [s for s, n in series.items() if n > 1], "a series exported twice"
    ours = {s.name: (f.type, s) for f in families.values() for s in f.samples if s.name.startswith("pa_clip_")}
    assert set(ours) <= set(METRICS)
    for name, (kind, _) in ours.items():
        assert kind == METRICS[name][0] and (kind != "counter" or name.endswith("_total")), name
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert {q for (name, labels) in values if name == "pa_clip_bank_score_quantile"
            for k, q in labels if k == "q"} == {"0.5", "0.9", "0.99"}
    # gauges hold one scoring instance's state: they carry its name; counters are one sum over instances
    gauges = {(name, labels) for name, labels in values if METRICS.get(name, ("",))[0] == "gauge"}
    assert gauges and all(dict(labels).get("instance") == "pa_clip_score_0_0" for _, labels in gauges)
    assert values[("pa_clip_bank_drift_alarm", (("bank", "washer"), ("instance", "pa_clip_score_0_0")))] in (0.0, 1.0)
    assert values[("pa_clip_bank_builds_total", (("bank", "(unknown)"), ("outcome", "failed")))] >= 1
    assert values[("pa_clip_images_out_of_distribution_total", (("bank", "washer"),))] >= 1
    later = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in parser.text_string_to_metric_families(second) for s in f.samples}
    assert not [k for k, v in values.items() if k[0] in METRICS and METRICS[k[0]][0] == "counter"
                and later.get(k, -1.0) < v], "a counter went down or left"


@pytest.mark.slow
def test_a_deleted_banks_gauges_leave_without_harm_with_two_scoring_instances(repository, lot, workdir):
    """On a host with several scoring instances (KIND_GPU: one per GPU) the instances' Metric objects share one
    series per label set: a family made again by one instance (TritonTelemetry.drop_gauges) freed the series the
    other still wrote to: tritonserver died of a segfault (Signal 11) while serving, or aborted on a corrupt heap
    ("malloc_consolidate(): unaligned fastbin chunk detected", Signal 6) when it unloaded the models."""
    repo = workdir / "two_scorers" / "model_repository"
    shutil.copytree(repository, repo)
    config = repo / "pa_clip_score" / "config.pbtxt"
    text = config.read_text()
    assert "count: 1" in text
    config.write_text(text.replace("count: 1", "count: 2"))
    log = workdir / "two_scorers.log"
    server = start_server(repo, workdir / "banks_two_scorers", log)
    try:
        client = PAClipClient(server.http_url, timeout_s=60)  # a crashed tritonserver left the test waiting
        for bank in ("gone", "stays"):
            client.add_images(bank, "washer", lot, reset=True)
            client.build_bank(bank, {"mode": "pad_mpam"})

        def score(bank, seed):
            own = PAClipClient(server.http_url, timeout_s=60)
            for i in range(4):
                noise = np.random.default_rng(seed * 10 + i).integers(-4, 5, lot[:4].shape)
                own.score(np.clip(lot[:4].astype(int) + noise, 0, 255).astype(np.uint8), bank)
            own.close()

        def both(bank, seeds):  # two requests at once: both instances get new images of the bank
            threads = [threading.Thread(target=score, args=(bank, s)) for s in seeds]
            [t.start() for t in threads]
            [t.join() for t in threads]

        for cycle in range(2):  # the corruption depends on which instance drops first: a few rounds
            if cycle:
                client.add_images("gone", "washer", lot, reset=True)
                client.build_bank("gone", {"mode": "pad_mpam"})
            both("gone", (10 * cycle + 1, 10 * cycle + 2))
            both("stays", (10 * cycle + 3, 10 * cycle + 4))
            client.delete_bank("gone")
            time.sleep(6)  # past ScoreService.DELETED_SWEEP_S: each instance's next request drops the gauges
            both("stays", (10 * cycle + 5, 10 * cycle + 6, 10 * cycle + 7))
            both("stays", (10 * cycle + 8, 10 * cycle + 9, 10 * cycle + 0))
        # several instances share each family: a deleted bank's gauges read NaN (a family made again crashed it)
        parser = pytest.importorskip("prometheus_client.parser")
        samples = [s for f in parser.text_string_to_metric_families(metrics_text(server)) for s in f.samples
                   if s.name == "pa_clip_bank_drift_alarm"]
        gone = [s for s in samples if s.labels["bank"] == "gone"]
        assert gone and all(np.isnan(s.value) for s in gone)
        assert {s.labels["instance"] for s in samples if s.labels["bank"] == "stays"} == \
            {"pa_clip_score_0_0", "pa_clip_score_0_1"}  # each instance's own window
        client.close()
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    assert not re.search(r"malloc|Signal \((6|11)\)", text), text[-2000:]
    assert "successfully unloaded 'pa_clip_score'" in text
