"""Out-of-distribution decisions (postprocess/ood.py): statistics from the map and the pixels, thresholds calibrated
on the lot and kept in the bank, an image outside any of them decided out_of_distribution with why."""

import math

import numpy as np
import pytest

from postprocess import ood
from postprocess.bank import build_bank, image_key, score_with_bank
from postprocess.config import PAClipConfig
from postprocess.decision import OUT_OF_DISTRIBUTION, Decider
from postprocess.pipeline import LotScorer
from postprocess.serving import summary


def new_washers(folder, n_images: int, seed: int) -> np.ndarray:
    """New good washers of the demo's making, as the 112-pixel test encoder is sent them."""
    from client.demo_lot import write_demo_lot
    from client.infer import load_image

    folder = write_demo_lot(folder, n_images=n_images, n_defective=0, size=128, seed=seed)
    return np.stack([load_image(p, 112)[1] for p in sorted(folder.glob("*.png"))])


def test_statistics_read_the_map_and_the_pixels():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, :2] = 1.0  # half the map high
    images = np.full((2, 4, 4, 3), 100, np.uint8)
    images[1, :, :2] = 200
    values = ood.image_statistics(maps, images)
    assert values["map_median"].tolist() == [0.0, 0.5] and values["map_mean"].tolist() == [0.0, 0.5]
    assert values["map_q75"].tolist() == [0.0, 1.0]
    assert values["brightness"].tolist() == [100.0, 150.0] and values["contrast"].tolist() == [0.0, 50.0]
    with pytest.raises(ValueError, match="unknown out-of-distribution statistic"):
        ood.image_statistics(maps, images, ["sharpness"])


def test_thresholds_from_the_lot_flag_what_lies_outside_either_side():
    rng = np.random.default_rng(0)
    lot = {"map_median": rng.normal(0.1, 0.01, 40), "brightness": rng.normal(120, 3, 40)}
    calibration = ood.calibrate_ood(lot, ("map_median", "brightness"), 0.01)
    assert math.isinf(calibration.low["map_median"]) and calibration.low["brightness"] < 110
    probe = {"map_median": np.array([0.1, 0.5, 0.1, 0.1]), "brightness": np.array([120, 120, 60, 180])}
    hit, why = calibration.outside(probe)
    assert hit.tolist() == [False, True, True, True] and why == [[], ["map_median"], ["brightness"], ["brightness"]]
    assert not calibration.outside(lot)[0].any()  # never inside the lot's own range
    restored = ood.OodCalibration.from_dict(calibration.to_dict())
    assert restored.outside(probe)[0].tolist() == hit.tolist()
    assert calibration.to_dict()["low"]["map_median"] is None  # JSON has no infinity
    for broken, words in (({"statistics": ["nope"]}, "out-of-distribution statistics"), ({"budget": 0.9}, "budget"),
                          ({"statistics": []}, "out-of-distribution statistics")):
        with pytest.raises(ValueError, match=words):  # what the check says, not a KeyError further on
            ood.OodCalibration.from_dict({**calibration.to_dict(), **broken})
    assert "brightness lies outside" in ood.reason(["brightness"]) and "camera moved" in ood.reason(["map_median"])


def test_a_lot_image_read_off_its_served_float16_map_is_still_inside():
    """Where the tail's threshold falls inside the lot (one lot image far above the rest), the lot's largest value is
    the threshold; the client reads it off the map as served (float16), which can round it up."""
    lot = {"map_median": np.r_[0.05 + np.linspace(0, 1e-3, 20), 0.08683]}
    calibration = ood.calibrate_ood(lot, ("map_median",), 0.005)
    assert calibration.high["map_median"] < 0.087  # the lot's largest value sets it
    served = np.float16(lot["map_median"].astype(np.float32)).astype(np.float64)
    assert served[-1] > lot["map_median"][-1]  # float16 rounds it up
    assert not calibration.outside({"map_median": served})[0].any()
    assert calibration.outside({"map_median": np.array([0.09])})[0].all()
    # a product whose maps stay below float16's smallest normal value: there its rounding is absolute
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.5e-6, 1.5e-6, (20, 16, 16)).astype(np.float32)
    maps[-1] *= 2.9
    pixels = rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    tiny = ood.calibrate_ood(ood.image_statistics(maps, pixels, ("map_q75",)), ("map_q75",))
    served = ood.image_statistics(maps.astype(np.float16).astype(np.float32), pixels, ("map_q75",))
    assert served["map_q75"].max() > ood.image_statistics(maps, pixels, ("map_q75",))["map_q75"].max()
    assert not tiny.outside(served)[0].any()


def test_a_lot_image_far_below_the_rest_is_inside_its_own_two_sided_calibration():
    """Two-sided statistics get a lower bound from the tail of the negated values, which one dark image far below
    the rest does not stretch: the bound would lie above it. The lot's own bottom value caps it, as its top caps the
    upper bound: no lot image is foreign to its own lot."""
    brightness = np.r_[120 + np.linspace(0, 1, 39), 60.0]
    calibration = ood.calibrate_ood({"brightness": brightness}, ("brightness",))
    assert calibration.low["brightness"] <= 60.0 and calibration.high["brightness"] >= 121.0
    assert not calibration.outside({"brightness": brightness})[0].any()
    assert calibration.outside({"brightness": np.array([50.0])})[0].all()  # darker than the lot's darkest still is


def test_the_budget_is_shared_among_the_statistics_and_halved_between_the_sides_of_a_two_sided_one():
    """The budget is what the lot's own parts leave outside all statistics together: two statistics at 0.01 get
    0.005 each, and brightness, outside on either side, 0.0025 a side. Each threshold is the decision's tail method
    at that share; the lot is an exponential (and a two-sided Laplace) tail whose thresholds lie past its range."""
    from postprocess.decision import calibrate

    n = 60
    p = (np.arange(n) + 0.5) / n  # the lot's values at evenly spaced quantiles of its distribution
    q75 = 0.1 - 0.01 * np.log1p(-p)
    brightness = 120 - 3 * np.sign(p - 0.5) * np.log1p(-2 * np.abs(p - 0.5))
    calibration = ood.calibrate_ood({"map_q75": q75, "brightness": brightness}, ("map_q75", "brightness"), 0.01)
    expected = {"map_q75": calibrate(q75, None, 0.005, ood.OOD_METHOD).threshold,
                "brightness": calibrate(brightness, None, 0.0025, ood.OOD_METHOD).threshold}
    lower = -calibrate(-brightness, None, 0.0025, ood.OOD_METHOD).threshold
    assert expected["map_q75"] > q75.max() and expected["brightness"] > brightness.max()  # not the lot's range
    assert lower < brightness.min()
    assert calibration.high["map_q75"] == pytest.approx(expected["map_q75"], rel=1e-12)
    assert calibration.high["brightness"] == pytest.approx(expected["brightness"], rel=1e-12)
    assert calibration.low["brightness"] == pytest.approx(lower, rel=1e-12)


def test_a_bank_decides_a_black_frame_out_of_distribution_and_its_own_parts_not(tiny_clip_112, lot):
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    bank, report = build_bank(scorer, PAClipConfig(), "washer", tiny_clip_112.fingerprint)
    assert bank.manifest.ood["statistics"] == list(ood.DEFAULT_STATISTICS)
    decider = Decider.for_bank(summary(bank.manifest))
    decided = [decider.decide(float(s), m, img)["decision"] for s, m, img in zip(report.scores, report.maps, lot)]
    assert OUT_OF_DISTRIBUTION not in decided  # the lot's own parts lie inside the thresholds its values set
    frames = np.stack([np.zeros_like(lot[0]), np.full_like(lot[0], 255)])
    result = score_with_bank(bank, tiny_clip_112.encode(frames), np.full(2, -1))
    for i in range(2):
        got = decider.decide(float(result.scores[i]), result.maps[i], frames[i])
        assert got["decision"] == OUT_OF_DISTRIBUTION and "camera moved" in got["ood_reason"]
        # a blank frame is darker or brighter than every washer, and flat: the statistics that say so are named
        named = ood.named_in(got["ood_reason"])
        assert ood.REASONS["brightness"] in named and ood.REASONS["contrast"] in named, named
    # without the image sent there is no such decision (a caller that has only the score)
    assert decider.decide(float(result.scores[0]), result.maps[0])["decision"] != OUT_OF_DISTRIBUTION
    # a bank built before format 3 has no calibration: no such decisions
    old = {k: v for k, v in summary(bank.manifest).items() if k != "ood"}
    assert Decider.for_bank(old).decide(float(result.scores[0]), result.maps[0], frames[0])["decision"] != \
        OUT_OF_DISTRIBUTION
    assert image_key(frames[0]) not in bank.manifest.image_keys


def test_the_scoring_service_keeps_a_drift_window_that_alarms_on_a_brightening_line(tiny_clip_112, lot, tmp_path):
    """New washers of the same making keep the window steady; the same washers growing brighter image by image
    move the whole-image statistic away from the lot's, and the alarm is raised. The window goes to the metrics and
    to the store, where the bank's info shows it."""
    from postprocess.bank_store import BankStore
    from postprocess.serving import BankService, ScoreService
    from postprocess.telemetry import RecordingTelemetry

    fresh = new_washers(tmp_path / "new", 48, seed=11)
    store = BankStore(tmp_path / "banks")
    for bank_id in ("steady", "brighter"):
        store.save(build_bank(LotScorer(tiny_clip_112, lot, "washer", progress=False), PAClipConfig(), bank_id,
                              tiny_clip_112.fingerprint)[0])
    telemetry = RecordingTelemetry()
    service = ScoreService(store, tiny_clip_112.fingerprint, telemetry=telemetry)
    gain = np.linspace(1.0, 1.8, len(fresh))[:, None, None, None]
    brighter = np.clip(fresh.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    for bank_id, images in (("steady", fresh), ("brighter", brighter)):
        for start in range(0, len(images), 8):
            batch = images[start:start + 8]
            service.score(bank_id, *tiny_clip_112.encode(batch).outputs().values(), batch)
    steady, bright = service.drift.summary("steady"), service.drift.summary("brighter")
    assert steady["window"] == bright["window"] == len(fresh)
    assert not steady["alarm"] and bright["alarm"] and bright["drift"] > steady["drift"]
    assert bright["ood_rate"] > steady["ood_rate"]
    gauge = lambda name, bank: telemetry.values[(name, (("bank", bank),))]  # noqa: E731
    assert gauge("pa_clip_bank_drift_alarm", "brighter") == 1.0 and gauge("pa_clip_bank_drift_alarm", "steady") == 0.0
    assert ("pa_clip_bank_score_quantile", (("bank", "steady"), ("q", "0.9"))) in telemetry.values
    # the lot's own images sent again are not new, nor are parts the window holds: the window does not move
    service.score("steady", *tiny_clip_112.encode(lot[:4]).outputs().values(), lot[:4])
    assert service.drift.summary("steady")["seen"] == len(fresh)
    repeat = np.repeat(fresh[:1], 8, axis=0)
    service.score("steady", *tiny_clip_112.encode(repeat).outputs().values(), repeat)
    assert service.drift.summary("steady")["seen"] == len(fresh)
    info = BankService(store, tiny_clip_112.fingerprint, encode_images=None).handle("info", "brighter")
    (monitor,) = info["monitors"]
    # named: the statistic the window is least likely in under the lot (brightening: the brightness)
    assert monitor["alarm"] and monitor["window"] >= 8 and monitor["statistic"] == "brightness"
    # a bank deleted (by the bank model: the store is the witness) loses its gauges and window at the next request
    # for any bank, once the sweep interval is over; the other banks' stay
    store.delete("brighter")
    service._swept -= ScoreService.DELETED_SWEEP_S
    service.score("steady", *tiny_clip_112.encode(fresh[:2]).outputs().values(), fresh[:2])
    assert not [key for key in telemetry.values if ("bank", "brighter") in key[1] and key[0] != "pa_clip_images_"
                "scored_total" and key[0] != "pa_clip_images_out_of_distribution_total"]
    assert service.drift.summary("brighter") is None and gauge("pa_clip_bank_drift_alarm", "steady") == 0.0
    assert list(service._cache) == ["steady"]  # no longer held in memory, and the cache's gauge says so
    assert telemetry.values[("pa_clip_bank_cache_bytes", ())] == service.cached_bytes()
    # a bank loaded but never given a window (only its lot's own images sent) is let go too
    store.save(build_bank(LotScorer(tiny_clip_112, lot, "washer", progress=False), PAClipConfig(), "quiet",
                          tiny_clip_112.fingerprint)[0])
    service.score("quiet", *tiny_clip_112.encode(lot[:2]).outputs().values(), lot[:2])
    assert service.drift.summary("quiet") is None and "quiet" in service._cache
    store.delete("quiet")
    service._swept -= ScoreService.DELETED_SWEEP_S
    service.score("steady", *tiny_clip_112.encode(fresh[:2]).outputs().values(), fresh[:2])
    assert "quiet" not in service._cache
    assert not (tmp_path / "banks" / "brighter").exists()  # no window written back into the store


def test_the_drift_alarm_reads_every_statistic_and_pays_for_reading_several():
    """A line darkened to half within a lot whose brightness varies 4x (magnetic tile): no map moves and no single
    image leaves the lot's range, but the window's brightness is far from the lot's; the alarm is raised. A window
    drawn from the lot's own distributions is not alarmed, and a p-value is multiplied by the statistics read."""
    from postprocess.drift import ALARM_P, MIN_IMAGES, DriftMonitor

    rng = np.random.default_rng(5)
    lot = {"map_q75": rng.normal(0.1, 0.01, 36), "brightness": rng.uniform(52, 216, 36),
           "contrast": rng.uniform(10, 50, 36)}
    same = {k: rng.choice(v, 40) + rng.normal(0, 1e-4, 40) for k, v in lot.items()}
    darker = {**same, "brightness": same["brightness"] * 0.5}
    assert darker["brightness"].min() > 20 and darker["brightness"].max() < lot["brightness"].max()
    monitor = DriftMonitor()
    for bank, values in (("steady", same), ("darker", darker)):
        monitor.observe(bank, "v1", lot, np.zeros(40), values, np.zeros(40, bool))
    steady, dark = monitor.summary("steady"), monitor.summary("darker")
    assert 40 >= MIN_IMAGES and not steady["alarm"] and dark["alarm"] and dark["statistic"] == "brightness"
    from scipy.stats import ks_2samp

    alone = ks_2samp(darker["brightness"], lot["brightness"]).pvalue
    assert dark["drift_p"] == pytest.approx(min(1.0, 3 * alone)) and dark["drift_p"] < ALARM_P


def test_a_window_smaller_than_min_images_never_alarms_however_far_off():
    """Too few images say too little for an alarm: a window of 10 far above the lot has a p-value below the alarm
    level but raises nothing; MIN_IMAGES of the same far-off values do."""
    from postprocess.drift import ALARM_P, MIN_IMAGES, drift_test

    lot = {"brightness": np.linspace(100, 140, 36)}
    few = drift_test(lot, {"brightness": 200 + np.arange(10.0)})
    assert 10 < MIN_IMAGES and few["drift_p"] < ALARM_P and not few["alarm"]
    enough = drift_test(lot, {"brightness": 200 + np.arange(float(MIN_IMAGES))})
    assert enough["drift_p"] < ALARM_P and enough["alarm"]


def test_one_part_sent_over_and_over_is_one_image_of_the_window():
    """A station that inspects one part again and again (or a client that retries) does not fill the window with one
    value: 40 copies of one part are one image of it, and raise no alarm, where 40 distinct parts are 40."""
    from postprocess.drift import DriftMonitor

    rng = np.random.default_rng(3)
    lot = {"map_q75": rng.normal(0.1, 0.01, 36), "brightness": rng.normal(120, 10, 36),
           "contrast": rng.normal(30, 3, 36)}
    one = {k: np.full(40, v[0]) for k, v in lot.items()}
    monitor = DriftMonitor()
    repeated = monitor.observe("b", "v1", lot, np.zeros(40), one, np.zeros(40, bool), keys=["k"] * 40)
    assert repeated["window"] == repeated["seen"] == 1 and not repeated["alarm"]
    again = monitor.observe("b", "v1", lot, np.zeros(2), {k: v[:2] for k, v in one.items()}, np.zeros(2, bool),
                            keys=["k", "other"])
    assert again["window"] == 2
    distinct = monitor.observe("c", "v1", lot, np.zeros(40), one, np.zeros(40, bool), keys=[str(i) for i in range(40)])
    assert distinct["window"] == 40 and distinct["alarm"]  # 40 parts that all look the same: a changed line


def test_an_image_without_a_score_stays_out_of_the_window_which_stays_readable_json():
    """An invalid image (NaN score or statistic) is no evidence of drift, and a NaN in the window made the file that
    ``info`` reads invalid JSON: the window went missing from ``info`` without a word."""
    import json

    from postprocess.drift import DriftMonitor

    lot = {"map_q75": np.linspace(0.05, 0.15, 36), "brightness": np.linspace(100, 140, 36)}
    values = {"map_q75": np.array([0.1, np.nan, 0.1]), "brightness": np.array([120.0, 120.0, 120.0])}
    window = DriftMonitor().observe("b", "v1", lot, np.array([0.1, 0.2, np.nan]), values, np.zeros(3, bool),
                                    keys=["a", "b", "c"])
    assert window["window"] == window["seen"] == 1
    json.dumps(window, allow_nan=False)  # no NaN to write


def test_an_overlay_of_an_image_out_of_distribution_says_why_and_whether_it_scores_above_the_threshold():
    from client.heatmap import Caption

    why = ood.reason(["brightness"])
    text = Caption("x.png", 0.74, 1.0, OUT_OF_DISTRIBUTION, 0.1, reason=why, over_threshold=True).text()
    assert text.startswith("OUT OF DISTRIBUTION: its brightness lies outside the lot's") and \
        "above the threshold (a large defect?)" in text  # a part with a defect over much of it looks like this
    assert "above the threshold" not in Caption("x.png", 0.01, 0.0, OUT_OF_DISTRIBUTION, 0.1, reason=why).text()


def test_info_gets_the_end_of_a_burst_and_a_new_versions_window_without_another_request(tiny_clip_112, lot,
                                                                                          tmp_path):
    """The window goes to the store at most every MONITOR_WRITE_S; what a burst added after the first write is
    written when the interval is over, and a new version of the bank has its window written at once."""
    import time

    from postprocess.bank_store import BankStore
    from postprocess.serving import ScoreService

    fresh = new_washers(tmp_path / "new", 24, seed=12)
    store = BankStore(tmp_path / "banks")
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    store.save(build_bank(scorer, PAClipConfig(), "burst", tiny_clip_112.fingerprint)[0])
    service = ScoreService(store, tiny_clip_112.fingerprint)
    service.MONITOR_WRITE_S = 2.0
    # encoded first, so that the burst is three scorings: under a loaded CPU a burst longer than the interval lets
    # the timer write its middle (correct, but not what this checks)
    batches = [(fresh[start:start + 8], tiny_clip_112.encode(fresh[start:start + 8]).outputs().values())
               for start in range(0, 24, 8)]
    started = time.monotonic()
    for batch, outputs in batches:
        service.score("burst", *outputs, batch)
    if time.monotonic() - started < service.MONITOR_WRITE_S:
        assert [m["window"] for m in store.monitors("burst")] == [8]  # the first request's, at once
    deadline = time.monotonic() + 20
    while store.monitors("burst")[0]["window"] != 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.monitors("burst")[0]["window"] == 24  # the rest, once the interval was over
    store.save(build_bank(scorer, PAClipConfig(alpha=0.5), "burst", tiny_clip_112.fingerprint)[0])
    service.score("burst", *tiny_clip_112.encode(fresh[:8]).outputs().values(), fresh[:8])
    (window,) = store.monitors("burst")  # the new version's, without waiting for the interval
    assert window["window"] == 8 and window["version"] == store.current_version("burst")
    # a scoring process that is gone (a restart): its window was listed by info for a day and never removed
    import subprocess
    import sys

    from postprocess.atomic import HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monitor = tmp_path / "banks" / "burst" / "monitor"
    (monitor / f"{HOST}-{int(gone.stdout)}.json").write_text((monitor / f"{window['process']}.json").read_text())
    assert [m["process"] for m in store.monitors("burst")] == [window["process"]]
    assert store.clean() == [str(monitor / f"{HOST}-{int(gone.stdout)}.json")]
    assert sorted(p.stem for p in monitor.glob("*.json")) == [window["process"]]


def test_a_timers_older_window_never_lands_over_a_newer_alarm(tiny_clip_112, lot, tmp_path):
    """A held-back window's timer and a request whose alarm turned wrote at once, each what it had read: on a slow
    store the timer's older, steady window landed last, and info read "steady" while the window alarmed."""
    import threading
    import time

    from postprocess.bank_store import BankStore
    from postprocess.serving import ScoreService

    store = BankStore(tmp_path / "banks")
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    store.save(build_bank(scorer, PAClipConfig(), "race", tiny_clip_112.fingerprint)[0])
    service = ScoreService(store, tiny_clip_112.fingerprint)
    service.MONITOR_WRITE_S = 2.0  # long enough for the second request to be held back on a loaded CPU
    written = store.write_monitor
    timer_writing = threading.Event()

    def slow_write(bank_id, window):  # a shared volume's write and fsync
        if threading.current_thread() is not threading.main_thread():
            timer_writing.set()
            time.sleep(0.5)
        written(bank_id, window)

    store.write_monitor = slow_write
    fresh = new_washers(tmp_path / "new", 42, seed=12)
    dark = np.clip(fresh[2:].astype(np.float32) * 0.4, 0, 255).astype(np.uint8)  # the lamp failed
    # encoded before any request: each request is then only scored, well inside the interval
    batches = [(images, tiny_clip_112.encode(images).outputs().values()) for images in (fresh[:1], fresh[1:2], dark)]

    def request(which):
        images, outputs = batches[which]
        service.score("race", *outputs, images)

    request(0)  # written at once
    request(1)  # held back: a timer writes it when the interval is over
    assert timer_writing.wait(10)
    request(2)  # 40 darkened parts: the alarm turns, written at once
    live = service.drift.summary("race")
    assert live["alarm"]
    deadline = time.monotonic() + 5
    while service._deferred and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # the timer's slow write (if one was still due) is over
    (stored,) = store.monitors("race")
    assert (stored["alarm"], stored["window"], live["window"]) == (True, 42, 42)


def test_a_model_runs_in_one_instance_only_with_one_group_of_one_on_the_cpu_or_one_named_gpu():
    from postprocess.telemetry import sole_instance

    assert sole_instance({"instance_group": [{"count": 1}]}, "CPU")
    assert sole_instance({"instance_group": [{"count": 1, "gpus": [0]}]}, "GPU")
    assert not sole_instance({"instance_group": [{"count": 2}]}, "CPU")
    assert not sole_instance({"instance_group": [{"count": 1}]}, "GPU")  # one per GPU, however many
    assert not sole_instance({"instance_group": [{"count": 1}, {"count": 1}]}, "CPU")
    from postprocess.telemetry import instance_label

    assert instance_label({"model_instance_name": "pa_clip_score_0_0", "model_instance_kind": "CPU"}) == \
        "pa_clip_score_0_0"
    assert instance_label({"model_instance_name": "pa_clip_score_0_0", "model_instance_kind": "GPU",
                           "model_instance_device_id": "1"}) == "pa_clip_score_0_0_gpu1"  # named alike per GPU


def test_the_drift_window_holds_the_latest_256_new_images():
    """README and docs/design.md: the window is the last 256 new images of a bank; older ones leave it (a line that
    drifted and came back must stop alarming), while 'seen' counts every new image."""
    from postprocess.drift import DriftMonitor

    lot = {"brightness": np.linspace(100, 140, 36)}
    monitor = DriftMonitor()
    for start in range(0, 300, 50):  # 300 distinct parts in requests of 50
        idx = np.arange(start, start + 50, dtype=float)
        window = monitor.observe("b", "v1", lot, idx, {"brightness": np.full(50, 120.0)}, np.zeros(50, bool),
                                 keys=[str(int(i)) for i in idx])
    assert window["window"] == 256 and window["seen"] == 300
    assert window["score_quantiles"]["0.5"] == pytest.approx(np.median(np.arange(300 - 256, 300)))


def test_dropping_a_deleted_banks_gauges_keeps_its_counters():
    """drop_gauges takes a gone bank's state (gauges) off /metrics; counters are totals Prometheus rates are
    computed from, and removing them would read as a counter reset."""
    from postprocess.telemetry import RecordingTelemetry

    telemetry = RecordingTelemetry()
    telemetry.count("pa_clip_images_scored_total", 5, bank="gone")
    telemetry.gauge("pa_clip_bank_drift", 0.3, bank="gone")
    telemetry.gauge("pa_clip_bank_drift", 0.1, bank="kept")
    telemetry.drop_gauges(bank="gone")
    assert telemetry.values == {("pa_clip_images_scored_total", (("bank", "gone"),)): 5,
                                ("pa_clip_bank_drift", (("bank", "kept"),)): 0.1}


def _store_with_a_live_version(tmp_path):
    """A store whose bank 'washer' has a live version folder (no tensors: the drift windows never read them)."""
    from postprocess.bank_store import BankStore

    store = BankStore(tmp_path / "banks")
    (store.root / "washer" / "v-1").mkdir(parents=True)
    (store.root / "washer" / "CURRENT").write_text("v-1")
    return store


def test_persisted_drift_windows_are_read_back_newest_first_for_the_live_version_only(tmp_path):
    """What info shows under 'monitors' is every live scoring process's window as it wrote it, the latest first,
    and only those of the version served now (an old version's window says nothing about the bank in use)."""
    import json
    import os
    import subprocess
    import sys

    from postprocess.atomic import HOST

    store = _store_with_a_live_version(tmp_path)
    mine = {"version": "v-1", "window": 40, "seen": 41, "updated": 100.0, "drift": 0.25, "alarm": False,
            "score_quantiles": {"0.5": 0.1}}
    store.write_monitor("washer", mine)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live scoring process
    try:
        folder = store.root / "washer" / "monitor"
        (folder / f"{HOST}-{helper.pid}.json").write_text(json.dumps({**mine, "window": 7, "updated": 200.0}))
        assert store.monitors("washer") == [{**mine, "window": 7, "updated": 200.0, "process": f"{HOST}-{helper.pid}"},
                                            {**mine, "process": f"{HOST}-{os.getpid()}"}]
        (folder / f"{HOST}-{helper.pid}.json").write_text(json.dumps({**mine, "version": "v-0", "updated": 300.0}))
        assert [m["process"] for m in store.monitors("washer")] == [f"{HOST}-{os.getpid()}"]
    finally:
        helper.kill()
        helper.wait()


def test_a_drift_window_of_a_gone_process_is_not_shown_and_prune_removes_it(tmp_path):
    """Every restart left its window behind, listed by info as a scoring process for a day and removed by nothing;
    a live process's window stays (shown and kept), however many gone ones lie beside it."""
    import json
    import os
    import subprocess
    import sys

    from postprocess.atomic import HOST

    store = _store_with_a_live_version(tmp_path)
    store.write_monitor("washer", {"version": "v-1", "window": 3, "updated": 1.0})
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    folder = store.root / "washer" / "monitor"
    stale = folder / f"{HOST}-{gone}.json"
    stale.write_text(json.dumps({"version": "v-1", "window": 9, "updated": 2.0}))  # newer, and fresh on disk
    assert [m["process"] for m in store.monitors("washer")] == [f"{HOST}-{os.getpid()}"]
    assert str(stale) in store.prune()["removed"]
    assert sorted(p.name for p in folder.iterdir()) == [f"{HOST}-{os.getpid()}.json"]
    assert [m["window"] for m in store.monitors("washer")] == [3]


def test_drift_windows_are_read_as_strict_json_and_an_old_one_is_not_shown(tmp_path):
    """A window file is read like everything the project is handed (postprocess.strict_json): NaN or a key given
    twice leaves the window out instead of showing a value no JSON reader takes; one not rewritten for a day
    (MONITOR_FRESH_S) no longer describes the line."""
    import os

    from postprocess.atomic import HOST

    store = _store_with_a_live_version(tmp_path)
    mine = store.root / "washer" / "monitor" / f"{HOST}-{os.getpid()}.json"
    store.write_monitor("washer", {"version": "v-1", "window": 3, "updated": 1.0})
    assert [m["window"] for m in store.monitors("washer")] == [3]
    for text in ('{"version": "v-1", "window": 3, "updated": 1.0, "drift": NaN}',
                 '{"version": "v-1", "window": 3, "window": 4, "updated": 1.0}'):
        mine.write_text(text)
        assert store.monitors("washer") == [], text
    store.write_monitor("washer", {"version": "v-1", "window": 3, "updated": 1.0})
    old = mine.stat().st_mtime - store.MONITOR_FRESH_S - 60
    os.utime(mine, (old, old))
    assert store.monitors("washer") == []


def test_an_update_carries_the_drift_window_on_and_a_rebuild_starts_a_new_one(tiny_clip_112, lot, tmp_path):
    """Each update wrote a new version, and a new version started a new window: a line grown every hour never
    gathered the parts an alarm needs, and one update hid an alarm that was up. A version grown from the window's
    keeps its parts (tested against the grown lot's values); a bank built again starts afresh."""
    from postprocess.bank_store import BankStore
    from postprocess.growth import grow_bank
    from postprocess.serving import ScoreService

    fresh = new_washers(tmp_path / "new", 44, seed=13)
    store = BankStore(tmp_path / "banks")
    scorer = LotScorer(tiny_clip_112, lot, "washer", progress=False)
    store.save(build_bank(scorer, PAClipConfig(), "line", tiny_clip_112.fingerprint)[0])
    service = ScoreService(store, tiny_clip_112.fingerprint)
    service.MONITOR_WRITE_S = 0.0  # every window written for info at once
    brighter = np.clip(fresh[:40].astype(np.float32) * 1.8, 0, 255).astype(np.uint8)
    for start in range(0, 40, 8):
        service.score("line", *tiny_clip_112.encode(brighter[start:start + 8]).outputs().values(),
                      brighter[start:start + 8])
    before = service.drift.summary("line")
    assert before["alarm"] and before["window"] == 40
    grown, report = grow_bank(store.load("line", tiny_clip_112.fingerprint), tiny_clip_112.encode(fresh[40:]),
                              fresh[40:])
    assert report["folded_in"] >= 1
    store.save(grown)  # what the bank model's update writes
    # info shows it as the live version's before the scoring process has seen the update (it showed none)
    (shown,) = store.monitors("line")
    assert shown["version"] == store.current_version("line") and shown["window"] == 40 and shown["alarm"]
    one = brighter[:1] // 2 + 100  # one more part, not one the window holds
    service.score("line", *tiny_clip_112.encode(one).outputs().values(), one)
    after = service.drift.summary("line")
    assert after["version"] == store.current_version("line") != before["version"]
    assert after["window"] == 41 and after["alarm"]  # it was a window of 1, no alarm
    store.save(build_bank(scorer, PAClipConfig(), "line", tiny_clip_112.fingerprint)[0])  # built again
    assert store.monitors("line") == []  # the window of a version it did not grow from is not its own
    service.score("line", *tiny_clip_112.encode(fresh[:2]).outputs().values(), fresh[:2])
    rebuilt = service.drift.summary("line")
    assert rebuilt["window"] == 2 and not rebuilt["alarm"] and rebuilt["version"] == store.current_version("line")
