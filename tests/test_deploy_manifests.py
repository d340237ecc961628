"""docs/k8s/pa-clip.yaml has the shape docs/deploy.md describes (no cluster here: structure, not a dry-run apply)."""

from pathlib import Path

import yaml

from serve.local import RESTRICTED_APIS

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
    command = " ".join(container["args"])
    restricted = ",".join(RESTRICTED_APIS) + ":pa-clip-key=$(PA_CLIP_KEY)"  # the same APIs python -m serve guards
    assert f"--http-restricted-api={restricted}" in command and f"--grpc-restricted-protocol={restricted}" in command
    service = docs["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"]
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
