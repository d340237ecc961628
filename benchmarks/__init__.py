"""Numbers: data sets (``datasets``), the paper's metrics (``metrics``, one ``lot_metrics`` block for every caller),
accuracy tables (``evaluate``), parity with PyTorch (``parity``) and through the server (``serving_parity``), speed
(``encoder_speed``, ``scoring_speed``, ``serving_speed``) and memory (``memory``). Each prints a table.

May import every other package; nothing imports it except the tests.
"""
