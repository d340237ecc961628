"""Running the model repository on this machine: ``local`` (the tritonserver bundled in nvidia-pytriton, on
loopback), ``__main__`` (``python -m serve``: access key, supervision), ``guardian`` (ties the server and its stubs to
``python -m serve``), ``http_guard`` / ``grpc_guard`` (the only ports clients reach: they refuse hostile requests
before Triton allocates for them, ``request_checks`` holding what both check), ``canary`` (health that notices a dead
Python model), ``onnxruntime_backend`` (the stand-in for Triton's onnxruntime backend, copied into the server's backends folder),
``main_job`` (``./run.sh main``: export, serve, build, score).

May import: ``postprocess``, ``export``, ``client``. Never ``benchmarks``.
"""
