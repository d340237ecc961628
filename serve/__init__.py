"""Run the model repository on a local Triton server (see ``python -m serve --help``)."""
