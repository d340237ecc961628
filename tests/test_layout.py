"""The shape of the code: which package may import which, one home for the encoder contract, errors that say whose
fault they are."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from postprocess import contract as C
from postprocess.errors import RequestError
from postprocess.serving import describe_failure, parse_options, text_value

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("postprocess", "export", "client", "serve", "benchmarks", "cli")
# Who may import whom (docs/design.md; each package's __init__.py says the same).
ALLOWED = {
    "postprocess": set(),
    "export": {"postprocess"},
    "client": {"postprocess"},
    "serve": {"postprocess", "export", "client"},
    "benchmarks": {"postprocess", "export", "client", "serve"},
    "cli": {"postprocess", "export", "client", "serve", "benchmarks"},  # the console script: above everything
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Project packages each module of ``package`` imports (module-level or inside functions)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(PACKAGES)) - {package}
    return found


def test_packages_import_only_downwards():
    for package in PACKAGES:
        for module, imports in imported_packages(package).items():
            assert imports <= ALLOWED[package], f"{module} imports {sorted(imports - ALLOWED[package])}"


# The Python models tritonserver runs (model_repository/*/1/model.py) may import the stdlib, NumPy, Triton's module,
# CuPy and postprocess, nothing else: the server needs no torch, no open_clip, no export.
MODEL_FILES = sorted(ROOT.glob("model_repository/*/1/model.py"))
MODELS_MAY_IMPORT = {"numpy", "triton_python_backend_utils", "cupy", "postprocess"}
# Also run inside the server: the stand-in for Triton's onnxruntime backend (copied into its backends folder).
SERVER_SIDE_FILES = MODEL_FILES + [ROOT / "serve" / "onnxruntime_backend.py"]
NOT_IN_THE_SERVER = {"torch", "torchvision", "open_clip", "export.clip_encoder", "export.backbones",
                     "export.repository"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (module-level or inside functions), with ``from package import submodule``
    spelled out as ``package.submodule`` when the submodule is a file of the project."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            folder = ROOT.joinpath(*node.module.split("."))
            for alias in node.names:
                if (folder / f"{alias.name}.py").is_file() or (folder / alias.name / "__init__.py").is_file():
                    names.add(f"{node.module}.{alias.name}")
    return names


def test_the_python_models_import_only_postprocess():
    assert len(MODEL_FILES) >= 2, "no model_repository/*/1/model.py found"
    for path in MODEL_FILES:
        tops = {name.split(".")[0] for name in imported_modules(path)}
        outside = {top for top in tops if top not in sys.stdlib_module_names} - MODELS_MAY_IMPORT
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}: the server's Python models may " \
                            f"import only postprocess (and the stdlib, numpy, triton_python_backend_utils, cupy)"


def test_what_the_server_side_python_imports_imports_no_torch():
    """Imports, in a fresh interpreter, every project module the server's Python models import (as they do:
    followed from their real imports), and checks that none of them brought torch or open_clip with it."""
    modules = sorted({name for path in SERVER_SIDE_FILES for name in imported_modules(path)
                      if name.split(".")[0] in PACKAGES})
    assert "postprocess.serving" in modules and "postprocess.text_tokens" in modules, modules
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"found = sorted({set(NOT_IN_THE_SERVER)!r} & set(sys.modules))\n"
            "assert not found, f'importing {modules} imports {found}'")
    proc = subprocess.run([sys.executable, "-c", f"modules = {modules!r}\n" + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_main_only_parses_arguments():
    tree = ast.parse((ROOT / "export" / "__main__.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert functions == {"build_parser", "main"}
    for path in ROOT.rglob("*.py"):
        if ".venv" not in path.parts:
            assert "export.__main__ import" not in path.read_text() or path.name == "test_layout.py", path


def test_tensor_names_are_spelled_in_the_contract_only():
    """Python code outside the contract refers to the Triton tensor names through it (configs and tests may not)."""
    names = [f'"{n}"' for n in (C.LAYER_TOKENS, C.PATCH_EMBEDS, C.IMAGE_EMBEDS, C.TEXT_EMBEDS, C.ANOMALY_MAP)]
    offenders = []
    for package in PACKAGES + ("model_repository",):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "contract.py" and any(n in path.read_text() for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_a_request_error_is_the_callers_and_anything_else_is_ours_with_a_logged_id():
    logged = []
    message, internal = describe_failure("pa_clip_score", RequestError("unknown bank 'x'"), logged.append)
    assert (message, internal, logged) == ("pa_clip_score: unknown bank 'x'", False, [])
    try:
        {}["missing"]
    except KeyError as err:
        message, internal = describe_failure("pa_clip_bank", err, logged.append)
    assert internal and "internal error" in message and "KeyError" in message
    incident = message.split("internal error ")[1].split()[0]
    (entry,) = logged
    assert f"internal error {incident}" in entry and "Traceback" in entry and "missing" in entry


def test_request_text_and_options_are_checked():
    assert text_value(b"washer", "bank") == "washer"
    with pytest.raises(RequestError, match="'bank' must be UTF-8"):
        text_value(b"\xff\xfe", "bank")
    assert parse_options("") == {} and parse_options('{"mode": "pad"}') == {"mode": "pad"}
    for bad in ("[1,2]", "{not json", '"pad"', '{"mode": "pad", "mode": "mutual"}', '{"alpha": NaN}'):
        with pytest.raises(RequestError, match="'options' must be a JSON object"):
            parse_options(bad)


def test_the_clients_batch_limit_is_the_ensembles():
    """pa-clip score --batch-size took up to 64 while the ensemble takes 8: every request of a larger batch was
    refused and every image reported failed."""
    from export.triton_config import read_config
    from postprocess import contract as C

    config = read_config(Path(__file__).resolve().parents[1] / "model_repository" / C.ENSEMBLE / "config.pbtxt")
    assert config.max_batch_size == C.ENSEMBLE_MAX_BATCH


def test_a_keyed_clients_connections_fit_under_the_guards_cap_for_one_address_several_times():
    """A keyed client's connections count against the HTTP guard's per-address cap until their first head is read:
    at a cap of 64, `pa-clip score --concurrency 64` filled it, and a second client behind the same address got 503
    with its key."""
    from client.infer import MAX_CONCURRENCY, build_parser
    from serve.request_checks import Limits

    assert Limits().max_keyless_connections_per_peer >= 4 * MAX_CONCURRENCY
    most = build_parser().parse_args(["--images", "x", "--concurrency", str(MAX_CONCURRENCY)]).concurrency
    assert most == MAX_CONCURRENCY
