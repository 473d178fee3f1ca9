"""The model of a vLLM server: its command line (vLLM's flags, shell words), what it serves
and the serving settings the operator reads. Pure: imports nothing but
:mod:`finetune_operator.api`, :mod:`finetune_operator.domain` and the standard library."""
