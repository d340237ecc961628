"""What the scoring and bank services report for Prometheus, without depending on Triton.

The services call ``count`` / ``gauge`` on the telemetry they were given: ``NO_TELEMETRY`` in-process and in unit
tests, ``TritonTelemetry`` in the Python models, which publishes through Triton's custom-metrics API so the numbers
appear on the server's metrics port (``/metrics``) beside Triton's own.
"""

from __future__ import annotations

# name -> (kind, help text); labels are given per call
METRICS = {
    "pa_clip_images_scored_total": ("counter", "Images scored, per bank"),
    "pa_clip_score_requests_total": ("counter", "Scoring requests answered (errors included)"),
    "pa_clip_score_seconds_total": ("counter", "Seconds spent scoring requests (divide by the requests for a mean)"),
    "pa_clip_bank_cache_hits_total": ("counter", "Scoring requests served from a bank already loaded"),
    "pa_clip_bank_cache_misses_total": ("counter", "Bank loads from the store (first use, new version, evicted)"),
    "pa_clip_bank_cache_bytes": ("gauge", "Bytes of banks resident in the scoring service"),
    "pa_clip_bank_builds_total": ("counter", "Bank builds, per bank and outcome"),
    "pa_clip_bank_build_seconds_total": ("counter", "Seconds spent building banks, per bank"),
    "pa_clip_bank_score_quantile": ("gauge", "Quantile q of the scores of the latest new images, per bank"),
    "pa_clip_bank_ood_rate": ("gauge", "Share of the latest new images out of distribution, per bank"),
    "pa_clip_bank_drift": ("gauge", "Largest KS distance of the latest new images' statistics to the lot's"),
    "pa_clip_bank_drift_alarm": ("gauge", "1 while the latest new images are unlikely under the lot's distribution"),
    "pa_clip_images_out_of_distribution_total": ("counter", "New images out of distribution, per bank"),
    "pa_clip_monitor_errors_total": ("counter", "Failures of the drift windows (scoring went on)"),
}


class Telemetry:
    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        pass

    def gauge(self, name: str, value: float, **labels: str) -> None:
        pass

    def drop_gauges(self, **labels: str) -> None:
        """Remove every gauge series carrying these labels: the state of a thing that is gone (a deleted bank's
        drift figures), which would otherwise be exported at its last value for as long as the server runs."""


def _carries(key: tuple, labels: dict) -> bool:
    name, pairs = key
    return METRICS[name][0] == "gauge" and set(labels.items()) <= set(pairs)


NO_TELEMETRY = Telemetry()


class RecordingTelemetry(Telemetry):
    """Keeps the latest totals in a dict (tests, and anyone wiring another exporter)."""

    def __init__(self):
        self.values: dict = {}

    def count(self, name, value=1.0, **labels):
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0.0) + value

    def gauge(self, name, value, **labels):
        self.values[(name, tuple(sorted(labels.items())))] = value

    def drop_gauges(self, **labels):
        for key in [k for k in self.values if _carries(k, labels)]:
            del self.values[key]


def sole_instance(model_config: dict, instance_kind: str) -> bool:
    """Whether a model's config (Triton's JSON form) runs it in one instance on the whole server: one group of
    count 1, on the CPU (``instance_kind``, the Python backend's ``model_instance_kind``) or on one named GPU (a GPU
    group without ``gpus`` is one instance per GPU, however many there are)."""
    groups = model_config.get("instance_group") or [{}]
    if len(groups) != 1 or int(groups[0].get("count", 1)) != 1:
        return False
    return instance_kind != "GPU" or len(groups[0].get("gpus", [])) == 1


def instance_label(args: dict) -> str | None:
    """A Python model's instance, from the backend's ``initialize`` arguments: its name, and on a GPU its device
    (Triton names a GPU group's instances alike on every GPU: ``pa_clip_score_0_0`` on each)."""
    name = args.get("model_instance_name")
    if name and args.get("model_instance_kind") == "GPU":
        return f"{name}_gpu{args.get('model_instance_device_id', '?')}"
    return name


class TritonTelemetry(Telemetry):
    """Triton's custom metrics (``pb_utils.MetricFamily``), created on first use.

    ``instance``: this process's model instance, a label on its gauges (they hold its own state, a drift window or
    a cache: two instances writing one series showed whichever answered last; counters stay one sum). ``sole``:
    whether it is the model's only instance. Every instance's family of one name is one family of Triton's; the
    only way to take a series off /metrics is to make its family again, which frees it under every other instance
    still writing to it (tritonserver 2.51 crashed, signal 11, when a bank was deleted with two scoring instances):
    with several, a deleted bank's gauges read NaN instead, until the server restarts.
    """

    def __init__(self, pb_utils, instance: str | None = None, sole: bool = True):
        self._pb = pb_utils
        self._families: dict = {}
        self._metrics: dict = {}
        self._own = {"instance": instance} if instance else {}
        self._sole = sole

    def _metric(self, name: str, labels: dict):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            if name not in self._families:
                kind, description = METRICS[name]
                family_kind = self._pb.MetricFamily.COUNTER if kind == "counter" else self._pb.MetricFamily.GAUGE
                self._families[name] = self._pb.MetricFamily(name=name, description=description, kind=family_kind)
            self._metrics[key] = self._families[name].Metric(labels=dict(labels))
        return self._metrics[key]

    def count(self, name, value=1.0, **labels):
        self._metric(name, labels).increment(float(value))

    def gauge(self, name, value, **labels):
        self._metric(name, {**labels, **self._own}).set(float(value))

    def drop_gauges(self, **labels):
        gone = [key for key in self._metrics if _carries(key, labels)]
        if not self._sole:  # other instances hold this family too: a family made again would be freed under them
            for key in gone:
                self._metrics[key].set(float("nan"))
            return
        # a series stays on /metrics after its Metric object is destroyed, until its whole family is (Triton 2.51's
        # Python backend): the family is made again with the series that stay, at their values
        for name in {key[0] for key in gone}:
            family = [key for key in self._metrics if key[0] == name]
            kept = {key: self._metrics[key].value() for key in family if key not in gone}
            for key in family:  # the metrics before their family, as the backend asks
                del self._metrics[key]
            del self._families[name]
            for (_, pairs), value in kept.items():
                self._metric(name, dict(pairs)).set(value)
