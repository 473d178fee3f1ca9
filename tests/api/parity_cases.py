"""Manifests the API server refuses (and valid neighbours it accepts), written as YAML text.

Shared by the offline validator's tests and the embedded API server's: both must give the
server's verdict. YAML text, not dicts, so the quoting of each value is exactly what a user
writes (`"16"` is a string, `16` a number, `yes` a boolean for kubectl).
"""

from __future__ import annotations

from typing import Any

import yaml
from finetune_operator.tools.crdvalidation import load_documents

HEADER = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  baseModel:
    uri: pvc://models/llama
  dataset:
    train:
      uri: pvc://data/train.jsonl
  output:
    uri: pvc://adapters/out
"""


def manifest(spec_yaml: str = "", name: str = "bot") -> str:
    """A FineTuneJob whose spec gets the given YAML lines (indented by two spaces)."""
    extra = "".join(f"  {line}\n" for line in spec_yaml.strip("\n").splitlines())
    return HEADER.format(name=name) + extra


def body(spec_yaml: str = "", name: str = "bot") -> dict[str, Any]:
    (doc,) = load_documents(manifest(spec_yaml, name))
    assert isinstance(doc, dict)
    return doc


# (what, spec YAML the server refuses, field the error names, a valid neighbour)
QUOTED_SCALARS = [
    ("quoted rank", 'lora: {r: "16"}', "spec.lora.r", "lora: {r: 16}"),
    ("quoted backoffLimit", 'backoffLimit: "3"', "spec.backoffLimit", "backoffLimit: 3"),
    ("quoted suspend", 'suspend: "true"', "spec.suspend", "suspend: true"),
    ("quoted packing", 'training: {packing: "yes"}', "spec.training.packing", "training: {packing: yes}"),
    ("quoted batchSize", 'training: {batchSize: "8"}', "spec.training.batchSize", "training: {batchSize: 8}"),
]  # fmt: skip

CHILD_FIELDS = [
    (
        "gpuProduct with spaces",
        "resources: {gpus: 1, gpuProduct: NVIDIA H100 80GB HBM3}",
        "spec.resources.gpuProduct",
        "resources: {gpus: 1, gpuProduct: NVIDIA-H100-80GB-HBM3}",
    ),
    (
        "gpuProduct longer than a label value",
        f"resources: {{gpus: 1, gpuProduct: {'H' * 64}}}",
        "spec.resources.gpuProduct",
        f"resources: {{gpus: 1, gpuProduct: {'H' * 63}}}",
    ),
    (
        "nodeSelector key not a label key",
        'resources: {nodeSelector: {"gpu type": a100}}',
        "spec.resources.nodeSelector",
        "resources: {nodeSelector: {example.com/gpu-type: a100}}",
    ),
    (
        "nodeSelector key prefix over 253 characters",
        f"resources: {{nodeSelector: {{{'a' * 254}/pool: x}}}}",
        "spec.resources.nodeSelector",
        f"resources: {{nodeSelector: {{{'a' * 253}/pool: x}}}}",
    ),
    (
        "nodeSelector value not a label value",
        'resources: {nodeSelector: {pool: "gpu pool"}}',
        "spec.resources.nodeSelector.pool",
        "resources: {nodeSelector: {pool: gpu-pool}}",
    ),
    (
        "priorityClassName not a DNS subdomain",
        "resources: {priorityClassName: High_Priority}",
        "spec.resources.priorityClassName",
        "resources: {priorityClassName: high-priority}",
    ),
    (
        "queueName not a label value",
        'resources: {queueName: "team-a/gpu queue"}',
        "spec.resources.queueName",
        "resources: {queueName: team-a-gpu}",
    ),
    (
        "queueName longer than a label value",
        f"resources: {{queueName: {'q' * 64}}}",
        "spec.resources.queueName",
        f"resources: {{queueName: {'q' * 63}}}",
    ),
    (
        "toleration Exists with a value",
        "resources: {tolerations: [{key: nvidia.com/gpu, operator: Exists, value: present}]}",
        "spec.resources.tolerations[0].value",
        "resources: {tolerations: [{key: nvidia.com/gpu, operator: Exists}]}",
    ),
    (
        "tolerationSeconds with NoSchedule",
        "resources: {tolerations: [{key: spot, operator: Exists, effect: NoSchedule, tolerationSeconds: 300}]}",
        "spec.resources.tolerations[0].tolerationSeconds",
        "resources: {tolerations: [{key: spot, operator: Exists, effect: NoExecute, tolerationSeconds: 300}]}",
    ),
    (
        "toleration with an empty key and operator Equal",
        'resources: {tolerations: [{operator: Equal, value: "true"}]}',
        "spec.resources.tolerations[0].operator",
        "resources: {tolerations: [{operator: Exists}]}",
    ),
    (
        "toleration key not a label key",
        "resources: {tolerations: [{key: gpu type, operator: Exists}]}",
        "spec.resources.tolerations[0].key",
        "resources: {tolerations: [{key: gpu-type, operator: Exists}]}",
    ),
    (
        "toleration value not a label value",
        'resources: {tolerations: [{key: pool, value: "a b"}]}',
        "spec.resources.tolerations[0].value",
        "resources: {tolerations: [{key: pool, value: a-b}]}",
    ),
    (
        "node affinity In without values",
        "resources: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "{nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In}]}]}}}}",
        "matchExpressions[0].values",
        "resources: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "{nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In, values: [a]}]}]}}}}",
    ),
    (
        "node affinity Gt with a word",
        "resources: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "{nodeSelectorTerms: [{matchExpressions: [{key: cores, operator: Gt, values: [many]}]}]}}}}",
        "matchExpressions[0].values",
        "resources: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "{nodeSelectorTerms: [{matchExpressions: [{key: cores, operator: Gt, values: ['8']}]}]}}}}",
    ),
    (
        "pod anti-affinity without topologyKey",
        "resources: {affinity: {podAntiAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "[{labelSelector: {matchLabels: {app: trainer}}}]}}}",
        "topologyKey",
        "resources: {affinity: {podAntiAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "[{labelSelector: {matchLabels: {app: trainer}}, topologyKey: kubernetes.io/hostname}]}}}",
    ),
    (
        "pod affinity label selector key not a label key",
        "resources: {affinity: {podAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "[{labelSelector: {matchLabels: {'app name': x}}, topologyKey: kubernetes.io/hostname}]}}}",
        "labelSelector.matchLabels",
        "resources: {affinity: {podAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "[{labelSelector: {matchLabels: {app-name: x}}, topologyKey: kubernetes.io/hostname}]}}}",
    ),
]

# Refused only under strict field validation (kubectl apply's default); a client that does
# not ask for it has the field pruned instead, so nothing unknown reaches the Job either.
UNKNOWN_FIELDS = [
    (
        "affinity with a field the Pod API does not have",
        "resources: {affinity: {nodeAffinity: {preferredNodes: [gpu-1]}}}",
        "preferredNodes",
        "resources: {affinity: {nodeAffinity: {}}}",
    ),
]

BAD_NAMES = [
    ("uppercase and underscore", "My_Job"),
    ("longer than 253 characters", "a" * 254),
    ("ends with a dash", "bot-"),
    ("starts with a dot", ".bot"),
    ("a space", "my job"),
]
GOOD_NAMES = ["bot", "team-a.bot-1", "a" * 253]


def huge_affinity(target_bytes: int = 1_200_000) -> dict[str, Any]:
    """A node affinity of about ``target_bytes`` (what the issue found accepted and passed on)."""
    value = "v" * 60
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": [value] * 100}]}
    count = max(1, target_bytes // len(yaml.safe_dump(term)))
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term] * count}
        }
    }


# The longest label key: a 253-character DNS subdomain prefix, '/', a 63-character name.
LONGEST_KEY = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]) + "/" + "n" * 63


def largest_affinity() -> dict[str, Any]:
    """The largest affinity the CRD accepts: every list at its bound, every string at its max."""
    key, value = LONGEST_KEY, "v" * 63
    values = [value] * 8
    requirement = {"key": key, "operator": "In", "values": values}
    node_term = {
        "matchExpressions": [requirement] * 4,
        "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n" * 253]}],
    }
    selector = {
        "matchLabels": {f"{key[:-2]}{i:02d}": value for i in range(8)},
        "matchExpressions": [requirement] * 4,
    }
    pod_term = {
        "labelSelector": selector,
        "namespaceSelector": selector,
        "namespaces": [f"{'n' * 61}{i:02d}" for i in range(8)],
        "topologyKey": key,
    }
    pod = {
        "requiredDuringSchedulingIgnoredDuringExecution": [pod_term] * 4,
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": pod_term}
        ]
        * 4,
    }
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [node_term] * 4
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": node_term}
            ]
            * 4,
        },
        "podAffinity": pod,
        "podAntiAffinity": pod,
    }
