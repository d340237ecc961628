"""What a user runs against the server: ``infer.py`` (the command), ``triton_client`` (HTTP/gRPC client of the
``pa_clip`` ensemble and ``pa_clip_bank``), ``images`` (the one image reader, shared with the evaluation),
``heatmap`` (overlay pictures), ``report`` (the report page), ``banks`` (``python -m client.banks``: list, inspect,
delete and prune a server's banks), ``demo_lot`` (the built-in synthetic lot).

May import: ``postprocess`` (the contract's names, the atomic write), numpy, Pillow, matplotlib, tritonclient. Never ``export``,
``serve`` or ``benchmarks``: a client machine needs no torch.
"""
