"""Running the model repository on this machine: ``local`` (the tritonserver bundled in nvidia-pytriton, on
loopback), ``__main__`` (``python -m serve``), ``onnxruntime_backend`` (the stand-in for Triton's onnxruntime
backend, copied into the server's backends folder), ``main_job`` (``./run.sh main``: export, serve, build, score).

May import: ``postprocess``, ``export``, ``client``. Never ``benchmarks``.
"""
