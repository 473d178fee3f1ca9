"""Commands around the operator that do not run in it: the CRD and API reference generators
(``python -m finetune_operator.tools.crdgen``, ``... .tools.apidoc``), the offline manifest
validator (``python -m finetune_operator.tools.validate``) and ``finetune-operator
inspect-server``."""
