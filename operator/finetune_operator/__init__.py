"""finetune-operator: train, gate, canary and roll back LoRA adapters on Kubernetes.

Importing this package is cheap and pulls in neither kopf nor torch: the trainer image
imports the API models and the shared pure modules (estimator, gates) from here.
"""

__version__ = "0.1.0"
