"""What a vLLM server in a pod template will believe about itself, read as vLLM reads it.

Given a Deployment (or a pod template, or a pod spec), the ConfigMaps of its namespace and
the image patterns that mark the vLLM image, :func:`inspect` finds the vLLM container among
sidecars and reports the LoRA settings, the adapters it lists, whether runtime LoRA updating
is on, where its API key comes from, its port and API-server count, and every problem that
makes vLLM refuse to start or the operator unable to read a setting. Pure: nothing here does
I/O; the caller fetches the ConfigMaps :func:`configmaps_needed` names.

The command line is read by :mod:`finetune_operator.serving.vllm_args`; the environment the way the
kubelet builds it (``envFrom`` in order, then ``env``, the last entry of a name winning) and
then as vLLM's ``envs.py`` reads it (identical in 0.8.5, 0.11, 0.20 and 0.34):

- ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: on only for ``1`` or ``true`` after ``strip().lower()``;
- ``VLLM_API_KEY``: used only when ``--api-key`` is absent; empty keys are ignored.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import vllm_args
from .vllm_args import LoraModule, ServerArgs, Version

RUNTIME_UPDATES_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
API_KEY_ENV = "VLLM_API_KEY"

# ConfigMap name -> its data (key -> text).
ConfigMaps = Mapping[str, Mapping[str, str]]


def vllm_env_true(value: str) -> bool:
    """vLLM's reading of VLLM_ALLOW_RUNTIME_LORA_UPDATING (vllm/envs.py)."""
    return value.strip().lower() in ("1", "true")


# ------------------------------------------------------------------ environment


@dataclass(frozen=True)
class EnvValue:
    """One environment variable as the container will see it."""

    state: str  # "set", "unset" or "unknown"
    value: str | None = field(default=None, repr=False)
    source: Mapping[str, Any] = field(default_factory=dict)  # where it comes from (no value)


def _configmap_value(
    configmaps: ConfigMaps, name: str, key: str, source: dict[str, Any]
) -> EnvValue:
    data = configmaps.get(name)
    if data is None or key not in data:
        return EnvValue("unknown", None, source)
    return EnvValue("set", str(data[key]), source)


def env_value(
    container: Mapping[str, Any],
    name: str,
    configmaps: ConfigMaps | None = None,
    shell_env: Mapping[str, str | None] | None = None,
) -> EnvValue:
    """The value of ``name`` in the container: ``env`` beats ``envFrom``, last entry wins.

    ``shell_env``: assignments a ``sh -c`` script makes before starting vLLM (they win).
    Values from Secrets are never read here: such a variable is ``unknown`` with its source.
    """
    cms = configmaps or {}
    if shell_env and name in shell_env:
        value = shell_env[name]
        if value is None:
            return EnvValue("unknown", None, {"from": "shell"})
        return EnvValue("set", value, {"from": "shell"})
    for var in reversed(list(container.get("env") or [])):
        if var.get("name") != name:
            continue
        if "valueFrom" not in var:
            value = str(var.get("value") or "")
            if "$(" in value:  # the kubelet expands $(OTHER_VAR): not read here
                return EnvValue("unknown", None, {"from": "env", "name": name})
            return EnvValue("set", value, {"from": "env", "name": name})
        ref = var.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            sec = ref["secretKeyRef"] or {}
            src = {"from": "secret", "secret": sec.get("name"), "key": sec.get("key")}
            return EnvValue("unknown", None, src)
        if "configMapKeyRef" in ref:
            cm = ref["configMapKeyRef"] or {}
            src = {"from": "configMap", "configMap": cm.get("name"), "key": cm.get("key")}
            return _configmap_value(cms, str(cm.get("name")), str(cm.get("key")), src)
        return EnvValue("unknown", None, {"from": "env", "name": name, "valueFrom": True})
    for source in reversed(list(container.get("envFrom") or [])):
        prefix = str(source.get("prefix") or "")
        if prefix and not name.startswith(prefix):
            continue
        key = name[len(prefix) :]
        if "secretRef" in source:
            sec = (source.get("secretRef") or {}).get("name")
            return EnvValue("unknown", None, {"from": "envFrom", "secret": sec, "maybe": True})
        if "configMapRef" in source:
            cm_name = str((source.get("configMapRef") or {}).get("name"))
            data = cms.get(cm_name)
            src = {"from": "envFrom", "configMap": cm_name}
            if data is None:
                return EnvValue("unknown", None, {**src, "maybe": True})
            if key in data:
                return EnvValue("set", str(data[key]), src)
    return EnvValue("unset")


def runtime_lora_updating(
    container: Mapping[str, Any],
    configmaps: ConfigMaps | None = None,
    shell_env: Mapping[str, str | None] | None = None,
) -> bool | None:
    """Whether vLLM enables its runtime LoRA endpoints; None when the operator cannot tell."""
    env = env_value(container, RUNTIME_UPDATES_ENV, configmaps, shell_env)
    if env.state == "unset":
        return False
    if env.state == "unknown" or env.value is None:
        return None
    return vllm_env_true(env.value)


# ------------------------------------------------------------------ API key


@dataclass(frozen=True)
class ApiKeySource:
    """Where the server's API key comes from. ``literal`` is never reported or logged."""

    kind: str  # args, config, env, shell, secret, configMap, envFrom
    name: str | None = None  # Secret or ConfigMap name
    key: str | None = None  # key in it
    maybe: bool = False  # envFrom: the Secret may or may not hold VLLM_API_KEY
    literal: str | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.kind}
        if self.kind in ("secret", "envFrom") and self.name:
            out["secret"] = self.name
        if self.kind == "configMap" and self.name:
            out["configMap"] = self.name
        if self.key:
            out["key"] = self.key
        if self.kind in ("env", "shell"):
            out["name"] = API_KEY_ENV
        if self.maybe:
            out["maybe"] = True
        return out


def _api_key(
    args: ServerArgs, container: Mapping[str, Any], configmaps: ConfigMaps
) -> ApiKeySource | None:
    # vLLM: `args.api_key or [envs.VLLM_API_KEY]`, then drops empty keys.
    if args.api_key_flag:
        if args.api_key_dynamic:
            return ApiKeySource("args")
        if not args.api_keys_given:
            return None
        kind = "config" if args.api_key_from_config else "args"
        return ApiKeySource(kind, literal=args.api_keys[0])
    env = env_value(container, API_KEY_ENV, configmaps, args.shell_env)
    if env.state == "unset":
        return None
    src = env.source
    kind = str(src.get("from"))
    if env.state == "set":
        if not env.value:
            return None
        if kind == "envFrom":
            return ApiKeySource("configMap", src.get("configMap"), API_KEY_ENV, literal=env.value)
        if kind == "configMap":
            return ApiKeySource(kind, src.get("configMap"), src.get("key"), literal=env.value)
        return ApiKeySource(kind, literal=env.value)
    if kind == "secret":
        return ApiKeySource("secret", src.get("secret"), src.get("key"))
    if kind == "envFrom":
        name = src.get("secret") or src.get("configMap")
        return ApiKeySource("envFrom", name, API_KEY_ENV, maybe=True)
    if kind == "configMap":
        return ApiKeySource("configMap", src.get("configMap"), src.get("key"))
    return ApiKeySource(kind)


def resolve_api_key(
    source: ApiKeySource | None, secrets: Mapping[str, Mapping[str, str]]
) -> str | None:
    """The key to send as a Bearer token; ``secrets``: Secret name -> decoded data."""
    if source is None:
        return None
    if source.literal is not None:
        return source.literal
    if source.kind in ("secret", "envFrom") and source.name:
        value = (secrets.get(source.name) or {}).get(source.key or API_KEY_ENV)
        return value or None
    return None


# ------------------------------------------------------------------ --config files


@dataclass(frozen=True)
class ConfigFileSource:
    """The ConfigMap entry a ``--config`` path is mounted from."""

    configmap: str
    key: str
    path: str


def _pod_spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod spec of a Deployment, a pod template or a pod spec."""
    if "containers" in obj:
        return obj
    spec = obj.get("spec") or {}
    if "containers" in spec:
        return spec
    template = spec.get("template") or obj.get("template") or {}
    return template.get("spec") or {}


def config_file_source(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], path: str
) -> ConfigFileSource | str:
    """Which ConfigMap key holds ``path`` in this container, or why none does."""
    if not path.startswith("/"):
        workdir = container.get("workingDir")
        if not workdir:
            return (
                f"--config {path} is a relative path and the container sets no workingDir: "
                "the operator cannot tell which file vLLM reads (use an absolute path)"
            )
        path = posixpath.join(str(workdir), path)
    path = posixpath.normpath(path)
    mounts = [
        m
        for m in container.get("volumeMounts") or []
        if path == posixpath.normpath(str(m.get("mountPath")))
        or path.startswith(posixpath.normpath(str(m.get("mountPath"))).rstrip("/") + "/")
    ]
    if not mounts:
        return (
            f"--config {path} is not in a ConfigMap volume the operator can read (no volume "
            "is mounted there): mount the file from a ConfigMap"
        )
    mount = max(mounts, key=lambda m: len(str(m.get("mountPath"))))
    volume = next(
        (v for v in pod_spec.get("volumes") or [] if v.get("name") == mount.get("name")), None
    )
    rel = posixpath.relpath(path, posixpath.normpath(str(mount.get("mountPath"))))
    rel = "" if rel == "." else rel
    sub = str(mount.get("subPath") or "")
    rel = posixpath.join(sub, rel) if sub and rel else sub or rel
    sources = _configmap_sources(volume)
    if not sources:
        kind = next((k for k in (volume or {}) if k != "name"), "missing")
        return (
            f"--config {path} is not in a ConfigMap volume the operator can read (volume "
            f"{mount.get('name')} is {kind}): mount the file from a ConfigMap"
        )
    for name, items in sources:
        if items is None:
            return ConfigFileSource(name, rel, path)
        for item in items:
            if posixpath.normpath(str(item.get("path"))) == rel:
                return ConfigFileSource(name, str(item.get("key")), path)
    names = ", ".join(n for n, _ in sources)
    return f"--config {path}: no item of ConfigMap {names} is mounted at that path"


def _configmap_sources(
    volume: Mapping[str, Any] | None,
) -> list[tuple[str, list[Mapping[str, Any]] | None]]:
    if not volume:
        return []
    if "configMap" in volume:
        cm = volume["configMap"] or {}
        return [(str(cm.get("name")), cm.get("items"))]
    if "projected" in volume:
        out: list[tuple[str, list[Mapping[str, Any]] | None]] = []
        for src in (volume["projected"] or {}).get("sources") or []:
            if "configMap" in src:
                cm = src["configMap"] or {}
                out.append((str(cm.get("name")), cm.get("items")))
        return out
    return []


def _config_reader(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], configmaps: ConfigMaps
) -> vllm_args.ConfigReader:
    def read(path: str) -> tuple[str | None, str | None]:
        where = config_file_source(pod_spec, container, path)
        if isinstance(where, str):
            return None, where
        data = configmaps.get(where.configmap)
        if data is None:
            return None, (
                f"--config {path} is in ConfigMap {where.configmap}, which the operator "
                "could not read (it does not exist, or the operator may not get it): create "
                "it, or fix the volume"
            )
        if where.key not in data:
            return None, f"--config {path}: ConfigMap {where.configmap} has no key {where.key}"
        return str(data[where.key]), None

    return read


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ServerModel:
    """What the vLLM server of a pod template will believe (vLLM's defaults where unset)."""

    vllm: bool
    container: str | None = None
    container_index: int | None = None
    image: str | None = None
    version: Version | None = None  # from the image tag; None: newest behaviour assumed
    form: str | None = None
    model: str | None = None
    served_model_names: tuple[str, ...] = ()
    enable_lora: bool = False
    max_lora_rank: int = vllm_args.DEFAULT_MAX_LORA_RANK
    max_loras: int = vllm_args.DEFAULT_MAX_LORAS
    max_cpu_loras: int = vllm_args.DEFAULT_MAX_LORAS  # effective: max_loras when unset
    lora_modules: tuple[LoraModule, ...] = ()
    runtime_lora_updating: bool | None = False
    api_key: ApiKeySource | None = None
    port: int = vllm_args.DEFAULT_PORT
    # False: the port cannot be told (a shell expansion, not an integer) or --uds replaces it.
    port_known: bool = True
    port_from_config: bool = False  # a `port:` of the --config file sets it
    api_server_count: int = 1
    config_file: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def base_model_names(self) -> list[str]:
        """Names the base model answers to: the served names, else the model itself."""
        if self.served_model_names:
            return list(self.served_model_names)
        return [self.model] if self.model else []

    def module(self, name: str) -> LoraModule | None:
        return next((m for m in self.lora_modules if m.name == name), None)

    def report(self) -> dict[str, Any]:
        """The ``finetune-operator inspect-server`` JSON object (never the API key itself)."""
        return {
            "vllm": self.vllm,
            "container": self.container,
            "form": self.form,
            "image": self.image,
            "model": self.model,
            "servedModelNames": list(self.served_model_names),
            "enableLora": self.enable_lora,
            "maxLoraRank": self.max_lora_rank,
            "maxLoras": self.max_loras,
            "maxCpuLoras": self.max_cpu_loras,
            "loraModules": [{"name": m.name, "path": m.path} for m in self.lora_modules],
            "runtimeLoraUpdating": self.runtime_lora_updating,
            "apiKey": self.api_key.describe() if self.api_key else None,
            "port": self.port,
            "apiServerCount": self.api_server_count,
            "configFile": self.config_file,
            "problems": list(self.problems),
        }


def _locate(
    container: Mapping[str, Any], patterns: Sequence[str] | None
) -> vllm_args.Located | None:
    return vllm_args.locate(container, image_patterns=patterns)


def find_vllm_container(
    obj: Mapping[str, Any],
    name: str | None = None,
    image_patterns: Sequence[str] | None = None,
) -> tuple[int | None, list[str]]:
    """Index of the vLLM container (``name``, else the one that runs vLLM) and problems.

    Raises ``ValueError`` when ``name`` is not a container of the pod template.
    """
    containers = list(_pod_spec(obj).get("containers") or [])
    if name is not None:
        for i, c in enumerate(containers):
            if c.get("name") == name:
                return i, []
        have = ", ".join(str(c.get("name")) for c in containers)
        raise ValueError(f"container {name!r} not found in the pod template (have: {have})")
    hits = [i for i, c in enumerate(containers) if _locate(c, image_patterns) is not None]
    if not hits:
        return None, []
    problems = []
    if len(hits) > 1:
        names = ", ".join(str(containers[i].get("name")) for i in hits)
        problems.append(
            f"containers {names} all run vLLM: the operator uses the first; set "
            "target.container to choose"
        )
    return hits[0], problems


def configmaps_needed(
    obj: Mapping[str, Any],
    container: str | None = None,
    image_patterns: Sequence[str] | None = None,
) -> list[str]:
    """Names of the ConfigMaps :func:`inspect` reads for this pod template."""
    pod_spec = _pod_spec(obj)
    try:
        idx, _ = find_vllm_container(pod_spec, container, image_patterns)
    except ValueError:
        return []
    if idx is None:
        return []
    c = pod_spec["containers"][idx]
    names: list[str] = []
    for var in c.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
        if ref and var.get("name") in (RUNTIME_UPDATES_ENV, API_KEY_ENV):
            names.append(str(ref.get("name")))
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            names.append(str((src.get("configMapRef") or {}).get("name")))
    loc = _locate(c, image_patterns)
    argv = [w.value for w in loc.argv] if loc else []
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        where = config_file_source(pod_spec, c, argv[argv.index("--config") + 1])
        if isinstance(where, ConfigFileSource):
            names.append(where.configmap)
    return sorted(set(names))


def configmaps_read(
    obj: Mapping[str, Any], image_patterns: Sequence[str] | None = None
) -> list[str]:
    """Names of the ConfigMaps :func:`inspect` reads for this pod template, whichever of its
    vLLM containers ``target.container`` names (other containers' ConfigMaps never feed the
    model): a change of one of them may change what the server accepts."""
    names: set[str] = set()
    for c in _pod_spec(obj).get("containers") or []:
        if c.get("name") is not None and _locate(c, image_patterns) is not None:
            names.update(configmaps_needed(obj, str(c["name"]), image_patterns))
    return sorted(names)


def edit_context(
    obj: Mapping[str, Any],
    container: str | None = None,
    configmaps: ConfigMaps | None = None,
    image_patterns: Sequence[str] | None = None,
) -> vllm_args.EditContext:
    """What :mod:`vllm_args`' edit functions need to read this container's --config file."""
    pod_spec = _pod_spec(obj)
    idx, _ = find_vllm_container(pod_spec, container, image_patterns)
    if idx is None:
        return vllm_args.EditContext(image_patterns=image_patterns)
    reader = _config_reader(pod_spec, pod_spec["containers"][idx], configmaps or {})
    return vllm_args.EditContext(image_patterns=image_patterns, read_config=reader)


def _api_server_count(args: ServerArgs, version: Version | None) -> int:
    """How many API-server processes vLLM starts (vllm/entrypoints/cli/serve.py)."""
    if not args.serve_command:
        return 1  # python -m ...api_server runs one server
    if args.api_server_count is not None:
        return args.api_server_count
    if version is not None and version <= vllm_args.OLD:
        return 1  # --api-server-count defaulted to 1
    if args.headless:
        return 0
    if args.external_lb:
        return 1
    if args.hybrid_lb:
        return args.data_parallel_size_local or 1
    return args.data_parallel_size


def inspect(
    obj: Mapping[str, Any],
    *,
    container: str | None = None,
    configmaps: ConfigMaps | None = None,
    image_patterns: Sequence[str] | None = None,
) -> ServerModel:
    """The server model of a Deployment, pod template or pod spec.

    ``container``: the container to read (``target.container``); by default the one
    running vLLM among sidecars. ``configmaps``: the namespace's ConfigMaps the operator
    could fetch (name -> data). ``image_patterns``: fnmatch patterns of images whose own
    entry point runs the vLLM server (default :data:`vllm_args.DEFAULT_IMAGE_PATTERNS`).
    Raises ``ValueError`` when ``container`` names no container.
    """
    cms = configmaps or {}
    pod_spec = _pod_spec(obj)
    idx, problems = find_vllm_container(pod_spec, container, image_patterns)
    if idx is None:
        return ServerModel(
            vllm=False,
            problems=(
                "no container runs the vLLM OpenAI server (expected vllm serve, python -m "
                "vllm.entrypoints.openai.api_server, python -m vllm.entrypoints.cli.main "
                "serve, one of those in sh -c, or a vLLM image with args only)",
            ),
        )
    c = pod_spec["containers"][idx]
    name = str(c.get("name")) if c.get("name") is not None else None
    loc = _locate(c, image_patterns)
    image = c.get("image")
    if loc is None:
        return ServerModel(
            vllm=False,
            container=name,
            container_index=idx,
            image=image,
            problems=(
                f"container {name} does not run the vLLM OpenAI server (expected vllm serve, "
                "python -m vllm.entrypoints.openai.api_server, python -m "
                "vllm.entrypoints.cli.main serve, one of those in sh -c, or a vLLM image "
                "with args only)",
            ),
        )
    version = vllm_args.image_version(image)
    reader = _config_reader(pod_spec, c, cms)
    args = vllm_args.parse_located(loc, version=version, read_config=reader)
    problems += args.problems
    if loc.form == "image entrypoint" and loc.argv:
        first = loc.argv[0].value
        if posixpath.basename(first) in ("vllm", "python", "python3", "sh", "bash"):
            problems.append(
                f"args start with {first!r} but the vLLM image's entry point already starts "
                "the server: put that command in command, not args"
            )
    runtime = runtime_lora_updating(c, cms, args.shell_env)
    servers = _api_server_count(args, version)
    if runtime and servers > 1:
        problems.append(
            f"{RUNTIME_UPDATES_ENV} is on and vLLM runs {servers} API-server processes "
            "(--api-server-count or --data-parallel-size): vLLM refuses to start"
        )
    if args.uds:
        problems.append(
            f"--uds {args.uds}: the server listens on a Unix socket, not on a TCP port the "
            "operator can reach"
        )
    return ServerModel(
        vllm=True,
        container=name,
        container_index=idx,
        image=image,
        version=version,
        form=loc.form,
        model=args.model,
        served_model_names=tuple(args.served_model_names),
        enable_lora=args.enable_lora,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.effective_max_cpu_loras,
        lora_modules=tuple(args.lora_modules),
        runtime_lora_updating=runtime,
        api_key=_api_key(args, c, cms),
        port=args.port,
        port_known=args.port_known and not args.uds,
        port_from_config=args.port_from_config,
        api_server_count=servers,
        config_file=args.config_file,
        problems=tuple(problems),
    )


def configmaps_from_manifests(docs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """ConfigMap name -> data, from parsed manifest documents."""
    out: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            name = str((doc.get("metadata") or {}).get("name"))
            out[name] = {str(k): str(v) for k, v in (doc.get("data") or {}).items()}
    return out
