"""The trainer that runs inside the trainer image: data, training, evaluation, reports.

Heavy libraries (torch, transformers, peft, trl) are imported inside the functions that use
them so that the CLI starts fast and `--help` works without a GPU stack.
"""

__version__ = "0.1.0"
