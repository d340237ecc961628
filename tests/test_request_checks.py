"""The guards' checks alone (serve.request_checks, serve.grpc_guard.check_inference_request): no server needed.
The same cases go through a real server in tests/test_serving_guard.py."""

import json
import os
import uuid

import pytest

from serve.request_checks import (SHM_DIR, Limits, Refused, check_inference_json, check_region_key, count_values,
                                  load_json)

LIMITS = Limits(max_request_bytes=1 << 20, max_json_bytes=1 << 16, max_image_side=112)


def refused(call, *args) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        call(*args)
    return caught.value.status, str(caught.value)


def infer_json(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


IMAGES_OK = {"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}


def test_json_as_triton_must_read_it():
    assert load_json(b'{"a": [1, {"b": 2}]}', "x", 4) == {"a": [1, {"b": 2}]}
    # duplicate keys: Triton keeps the first, Python the last; the probe hid a huge shape behind a small one
    assert refused(load_json, b'{"shape": [1], "shape": [2]}', "x", 32)[1].startswith("duplicate key 'shape'")
    assert "duplicate key 'inputs'" in refused(load_json, b'{"inputs": [], "inputs": []}', "x", 32)[1]
    assert "duplicate key" in refused(load_json, b'{"a": {"k": 1, "k": 1}}', "x", 32)[1]
    assert refused(load_json, b'[NaN]', "x", 32)[0] == 400
    assert refused(load_json, b'{"a": Infinity}', "x", 32)[0] == 400
    assert "nested 33 levels deep" in refused(load_json, b"[" * 33 + b"]" * 33, "x", 32)[1]
    load_json(b"[" * 32 + b"]" * 32, "x", 32)
    # deeper than Python's own recursion limit: a 400, not a RecursionError (the probe's 158 KB of traceback)
    assert refused(load_json, b"[" * 100_000 + b"]" * 100_000, "x", 32)[0] == 400
    assert "not valid JSON" in refused(load_json, b'{"a": ', "x", 32)[1]
    assert "not valid JSON" in refused(load_json, b'\xff\xfe', "x", 32)[1]


def test_value_count_is_iterative():
    deep = 0
    for _ in range(5000):
        deep = [deep]
    assert count_values(deep) == 1 and count_values([[1, 2], [3, [4, 5]]]) == 5


@pytest.mark.parametrize("item,status,words", [
    ({"name": "images", "shape": [1, 100000, 100000, 3], "datatype": "UINT8", "data": [0]}, 413, "claims shape"),
    ({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 11}, 400, "but carries 11"),
    ({"name": "images", "shape": [1, 200, 100, 3], "datatype": "UINT8", "data": [0]}, 413, "at most 112 pixels"),
    # too wide as well as too tall: the limit is on either side
    ({"name": "images", "shape": [1, 100, 200, 3], "datatype": "UINT8", "data": [0]}, 413, "at most 112 pixels"),
    ({"name": "images", "shape": [1, 0, 0, 3], "datatype": "UINT8", "data": []}, 400, "at least one pixel"),
    ({"name": "images", "shape": [1, -2, 2, 3], "datatype": "UINT8", "data": [0]}, 400, "non-negative integers"),
    ({"name": "images", "shape": [1, True, 2, 3], "datatype": "UINT8", "data": [0] * 6}, 400, "non-negative"),
    ({"name": "images", "shape": [1, 2.0, 2, 3], "datatype": "UINT8", "data": [0] * 12}, 400, "non-negative"),
    ({"name": "images", "shape": "1,2,2,3", "datatype": "UINT8", "data": [0] * 12}, 400, "list of non-negative"),
    ({"name": "bank", "shape": [10 ** 9, 1], "datatype": "BYTES", "data": ["a"]}, 413, "claims shape"),
    ({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8"}, 400, "carries no data"),
    ({"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12, "parameters": []}, 400,
     "'parameters' must be a JSON object"),
])
def test_claimed_shapes_against_what_a_json_request_carries(item, status, words):
    got, message = refused(check_inference_json, infer_json(item), None, LIMITS)
    assert got == status and words in message, message


def test_binary_parts_against_claimed_shapes():
    def body(shape, datatype, size, extra):
        head = infer_json({"name": "images" if datatype == "UINT8" else "bank", "shape": shape,
                           "datatype": datatype, "parameters": {"binary_data_size": size}})
        return head + bytes(extra), len(head)

    check_inference_json(*body([1, 2, 2, 3], "UINT8", 12, 12), LIMITS)
    assert "but carries 10 bytes" in refused(check_inference_json, *body([1, 2, 2, 3], "UINT8", 10, 10), LIMITS)[1]
    assert "more than the request carries" in refused(check_inference_json, *body([1, 2, 2, 3], "UINT8", 12, 4),
                                                      LIMITS)[1]
    assert "more than the request carries" in refused(check_inference_json, *body([1, 2, 2, 3], "UINT8", -1, 12),
                                                      LIMITS)[1]
    # BYTES: every element has a 4-byte length, so a claim of many elements needs that many bytes
    check_inference_json(*body([2, 1], "BYTES", 8, 8), LIMITS)
    assert "each element takes at least 4" in refused(check_inference_json, *body([1000, 1], "BYTES", 8, 8),
                                                      LIMITS)[1]
    assert refused(check_inference_json, infer_json(IMAGES_OK) + b" " * LIMITS.max_json_bytes, None, LIMITS)[0] == 413
    assert "'inputs' list" in refused(check_inference_json, b'{"inputs": {}}', None, LIMITS)[1]
    assert "'inputs' list" in refused(check_inference_json, b'[]', None, LIMITS)[1]


def test_grpc_requests_are_checked_like_http_ones():
    pytest.importorskip("grpc", reason="grpcio is not installed: pip install -e '.[serve]'")
    from tritonclient.grpc import service_pb2

    from serve.grpc_guard import check_inference_request

    def request(shape, datatype="UINT8", raw=None, values=None):
        message = service_pb2.ModelInferRequest(model_name="pa_clip")
        item = message.inputs.add(name="images", datatype=datatype, shape=shape)
        if raw is not None:
            message.raw_input_contents.append(raw)
        if values is not None:
            item.contents.uint_contents.extend(values)
        return message

    check_inference_request(request([1, 2, 2, 3], raw=bytes(12)), LIMITS)
    check_inference_request(request([1, 2, 2, 3], values=[0] * 12), LIMITS)
    for message, status, words in [(request([1, 100000, 100000, 3], raw=bytes(12)), 413, "claims shape"),
                                   (request([1, 2, 2, 3], raw=bytes(11)), 400, "but carries 11 bytes"),
                                   (request([1, 2, 2, 3], values=[0] * 5), 400, "but carries 5"),
                                   (request([1, 300, 2, 3], raw=bytes(1800)), 413, "at most 112 pixels"),
                                   (request([1, 0, 0, 3], raw=b""), 400, "at least one pixel"),
                                   (request([1, -1, 2, 3], raw=bytes(6)), 400, "non-negative")]:
        got, text = refused(check_inference_request, message, LIMITS)
        assert got == status and words in text, text
    two = request([1, 2, 2, 3], raw=bytes(12))
    two.raw_input_contents.append(b"x")
    assert "one per input" in refused(check_inference_request, two, LIMITS)[1]
    # Triton reads names as C strings: "images\0x" reached the model as 'images', past the image-size limit
    cut = request([1, 300, 2, 3], raw=bytes(1800))
    cut.inputs[0].name = "images\x00x"
    assert refused(check_inference_request, cut, LIMITS) == (400, "input name 'images\\x00x' must be a string "
                                                                   "without a NUL or another control character")
    out = request([1, 2, 2, 3], raw=bytes(12))
    out.outputs.add(name="score\x00")
    assert refused(check_inference_request, out, LIMITS)[0] == 400


def test_input_and_output_names_with_a_nul_are_refused_over_http_too():
    head = {"inputs": [{"name": "images\u0000x", "datatype": "UINT8", "shape": [1, 300, 2, 3],
                        "parameters": {"binary_data_size": 1800}}]}
    body = json.dumps(head).encode()
    status, text = refused(check_inference_json, body + bytes(1800), len(body), LIMITS)
    assert status == 400 and "input name" in text  # not the size check, which the name slipped past
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}],
                       "outputs": [{"name": "anomaly_map\u0007"}]}).encode()
    assert refused(check_inference_json, body, None, LIMITS)[0] == 400


def test_the_servers_own_shared_memory_regions_cannot_be_registered():
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this machine")
    region = SHM_DIR / f"pa_clip_{os.getpid()}_{uuid.uuid4().hex[:12]}_test"
    alias = SHM_DIR / f"client_alias_{uuid.uuid4().hex[:8]}"
    mine = SHM_DIR / f"pa_clip_in_{uuid.uuid4().hex[:12]}"  # a client's region (client/triton_client.py's names)
    region.write_bytes(bytes(64))
    mine.write_bytes(bytes(64))
    try:
        os.link(region, alias)  # the same region under a name of the client's choosing
        for key in (f"/{region.name}", region.name, f"/{alias.name}"):
            assert refused(check_region_key, key)[0] == 403
        for key in ("", "/", "/a/b", "/..", None, 5, "/x\x00y", "/x\udcff"):  # a NUL or a lone surrogate: a 400
            assert refused(check_region_key, key)[0] == 400
        check_region_key(f"/{mine.name}")
        check_region_key("/not_there_at_all")  # Triton says it does not exist
    finally:
        for path in (region, alias, mine):
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("shape", [[1, 13, 200, 3], [1, 200, 13, 3]], ids=["too short", "too narrow"])
def test_images_smaller_than_the_encoders_patch_are_refused_before_they_are_encoded(shape):
    """ONNX Runtime failed on them inside the ensemble: a 500 with its own error, where a 400 says what to send
    (whichever side is below the patch)."""
    item = {"name": "images", "shape": shape, "datatype": "UINT8", "data": [0]}
    got, message = refused(check_inference_json, infer_json(item), None, Limits(min_image_side=14))
    assert got == 400 and "14-pixel patches: each side must be at least that" in message, message


def test_an_encoder_without_a_patch_size_keeps_its_largest_side(tmp_path):
    """Read together, a fingerprint without patch_size lost the upper bound too."""
    import json

    from postprocess import contract as C
    from serve.request_checks import image_side_limits

    (tmp_path / C.VISION_MODEL).mkdir()
    fingerprint = {"image_size": 224, "dynamic_size": True}
    (tmp_path / C.VISION_MODEL / C.ENCODER_FILE).write_text(json.dumps(fingerprint))
    assert image_side_limits(tmp_path) == {"max_image_side": C.max_image_side(fingerprint)}
    (tmp_path / C.VISION_MODEL / C.ENCODER_FILE).write_text(json.dumps({**fingerprint, "patch_size": 14}))
    assert image_side_limits(tmp_path) == {"max_image_side": C.max_image_side(fingerprint), "min_image_side": 14}
