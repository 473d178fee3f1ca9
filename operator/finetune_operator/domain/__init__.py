"""Pure rules shared by the operator and the trainer: memory estimates, quality gates, adapter
digests, cron schedules. Imports nothing but :mod:`finetune_operator.api` and the standard
library (no kopf, Kubernetes client or aiohttp), so the trainer image can use it as is."""
