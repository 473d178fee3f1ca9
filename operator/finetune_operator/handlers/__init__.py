"""Thin kopf handlers; import finetune_operator.main to register them all."""
