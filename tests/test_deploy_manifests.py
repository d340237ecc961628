"""docs/k8s/pa-clip.yaml has the shape docs/deploy.md describes (no cluster here: structure, not a dry-run apply)."""

from pathlib import Path

import yaml

from serve import __main__ as serve_cli

ROOT = Path(__file__).resolve().parents[1]


def test_manifests_describe_replicas_on_a_shared_bank_store_behind_a_key():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "docs" / "k8s" / "pa-clip.yaml").read_text())}
    assert set(docs) == {"Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    env = {e["name"]: e for e in container["env"]}
    assert env["PA_CLIP_KEY"]["valueFrom"]["secretKeyRef"]["name"] == docs["Secret"]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["PA_CLIP_BANKS"]["value"] == mounts["banks"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims["banks"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    # the pods run python -m serve: its guards face clients (the key checked there, from $PA_CLIP_KEY), and its
    # canaries stand behind the readiness probe; tritonserver is the image's own, on loopback
    command = " ".join(container["args"])
    args = serve_cli.build_parser().parse_args(command.split("-m serve", 1)[1].split())
    assert args.tritonserver == "/opt/tritonserver/bin/tritonserver" and args.host == "0.0.0.0"
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.key is None and args.canary_interval > 0 and args.banks == mounts["banks"]
    service = docs["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"]
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
