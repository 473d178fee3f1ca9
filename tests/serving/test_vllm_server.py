"""The vLLM server model: every recognised form and spelling, as vLLM's own source reads it.

Sources cited as vLLM <version>:<file> (the unpacked wheels of 0.8.5, 0.11.0, 0.20.0, 0.34.0).
"""

from __future__ import annotations

import pytest
from finetune_operator.serving import vllm_args as va
from finetune_operator.serving import vllm_server as vs


def deployment(*containers: dict, volumes: list | None = None) -> dict:
    spec: dict = {"containers": list(containers)}
    if volumes is not None:
        spec["volumes"] = volumes
    return {"kind": "Deployment", "metadata": {"name": "llm"}, "spec": {"template": {"spec": spec}}}


def inspect(container: dict, **kw) -> vs.ServerModel:
    return vs.inspect(deployment({"name": "vllm", **container}), **kw)


# ------------------------------------------------------------------ forms


@pytest.mark.parametrize(
    ("container", "form", "model"),
    [
        # cli/main.py: `vllm serve [model_tag]`; serve.py sets args.model = args.model_tag.
        ({"command": ["vllm", "serve", "org/m"]}, "vllm serve", "org/m"),
        ({"command": ["/usr/local/bin/vllm"], "args": ["serve", "org/m"]}, "vllm serve", "org/m"),
        # openai/api_server.py __main__: make_arg_parser, the model from --model.
        (
            {
                "command": [
                    "python3",
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    "org/m",
                ]
            },
            "python -m vllm.entrypoints.openai.api_server",
            "org/m",
        ),
        (
            {
                "command": ["python", "-mvllm.entrypoints.openai.api_server"],
                "args": ["--model=org/m"],
            },
            "python -m vllm.entrypoints.openai.api_server",
            "org/m",
        ),
        # cli/main.py has `if __name__ == "__main__": main()` in every version.
        (
            {"command": ["python", "-m", "vllm.entrypoints.cli.main", "serve", "org/m"]},
            "python -m vllm.entrypoints.cli.main serve",
            "org/m",
        ),
        # The vLLM image's entry point receives args only.
        ({"image": "vllm/vllm-openai:v0.11.0", "args": ["org/m"]}, "image entrypoint", "org/m"),
        (
            {"image": "docker.io/vllm/vllm-openai:latest", "args": ["--model", "org/m"]},
            "image entrypoint",
            "org/m",
        ),
        # sh -c / bash -c strings: exec, env prefixes, && chains, line continuations.
        (
            {"command": ["/bin/sh", "-c"], "args": ["vllm serve org/m --enable-lora"]},
            "vllm serve in sh -c",
            "org/m",
        ),
        (
            {"command": ["bash", "-lc", "pip list && exec vllm serve 'org/m' \\\n  --port 9000"]},
            "vllm serve in sh -c",
            "org/m",
        ),
        (
            {
                "command": [
                    "sh",
                    "-ec",
                    "FOO=1 python3 -m vllm.entrypoints.openai.api_server --model org/m",
                ]
            },
            "python -m vllm.entrypoints.openai.api_server in sh -c",
            "org/m",
        ),
        (
            {"command": ["tini", "--", "/bin/bash", "-c", "vllm serve org/m"]},
            "vllm serve in sh -c",
            "org/m",
        ),
    ],
)
def test_forms(container: dict, form: str, model: str) -> None:
    server = inspect(container)
    assert server.vllm and server.form == form and server.model == model, server


@pytest.mark.parametrize(
    "container",
    [
        {"image": "example.com/app:1", "args": ["org/m"]},  # not a vLLM image: args mean nothing
        {"command": ["python", "app.py", "--enable-lora"]},
        {"command": ["sh", "-c", "python app.py"]},
        {"command": ["sh", "/start.sh"]},  # a script file the operator cannot see
    ],
)
def test_not_vllm(container: dict) -> None:
    server = inspect(container)
    assert not server.vllm and server.problems


def test_image_patterns_are_configurable() -> None:
    container = {"image": "registry.local/llm/vllm:0.11", "args": ["org/m", "--enable-lora"]}
    assert not inspect(container).vllm
    server = inspect(container, image_patterns=["registry.local/llm/vllm:*"])
    assert server.vllm and server.enable_lora and server.version == (0, 11)


def test_sidecars() -> None:
    dep = deployment(
        {"name": "proxy", "image": "envoy:1"},
        {"name": "server", "image": "vllm/vllm-openai:latest", "args": ["org/m"]},
    )
    server = vs.inspect(dep)
    assert (server.container, server.container_index) == ("server", 1)
    two = deployment(
        {"name": "a", "command": ["vllm", "serve", "m"]},
        {"name": "b", "command": ["vllm", "serve", "n"]},
    )
    both = vs.inspect(two)
    assert both.container == "a" and "target.container" in both.problems[0]
    assert vs.inspect(two, container="b").model == "n"
    with pytest.raises(ValueError, match="not found"):
        vs.inspect(two, container="c")


# ------------------------------------------------------------------ spellings


BASE = ["vllm", "serve", "org/m"]


@pytest.mark.parametrize(
    ("args", "field", "value"),
    [
        # FlexibleArgumentParser.parse_args: underscores to dashes before any '.'.
        (["--enable_lora"], "enable_lora", True),
        (["--enable-lora", "--max_lora_rank", "64"], "max_lora_rank", 64),
        (["--enable-lora", "--max-lora-rank=64"], "max_lora_rank", 64),
        # argparse BooleanOptionalAction: --no-X; 0.34 EnableDisableAction adds --disable-X.
        (["--enable-lora", "--no-enable-lora"], "enable_lora", False),
        (["--enable-lora", "--disable-lora"], "enable_lora", False),
        (["--no-enable-lora", "--enable-lora"], "enable_lora", True),
        # argparse keeps the last occurrence of a flag.
        (["--enable-lora", "--max-loras", "2", "--max-loras", "5"], "max_loras", 5),
        # argparse allow_abbrev: a unique prefix is the flag.
        (["--enable-lora", "--max-lora-r", "32"], "max_lora_rank", 32),
        # Defaults: vllm/config/lora.py (max_lora_rank 16, max_loras 1, max_cpu_loras None).
        ([], "max_lora_rank", 16),
        ([], "max_loras", 1),
        (["--enable-lora", "--max-loras", "3"], "max_cpu_loras", 3),
        # arg_utils.py: max_cpu_loras <= 0 means None, i.e. max_loras.
        (["--enable-lora", "--max-loras", "3", "--max-cpu-loras", "0"], "max_cpu_loras", 3),
        (["--enable-lora", "--max-cpu-loras", "8"], "max_cpu_loras", 8),
        # FrontendArgs.port = 8000.
        ([], "port", 8000),
        (["--port=9000"], "port", 9000),
        # ModelConfig.served_model_name takes one or more names.
        (["--served-model-name", "a", "b"], "served_model_names", ("a", "b")),
        # A value-less flag does not take the model: --enforce-eager is a BooleanOptionalAction.
        (["--enforce-eager"], "model", "org/m"),
        # FlexibleArgumentParser: -O3 carries its own value.
        (["-O3", "--port", "8002"], "port", 8002),
    ],
)
def test_spellings(args: list[str], field: str, value: object) -> None:
    server = inspect({"command": [*BASE, *args]})
    assert getattr(server, field) == value, server


@pytest.mark.parametrize(
    ("container", "known"),
    [
        ({"command": [*BASE, "--port", "9000"]}, True),
        ({"command": BASE}, True),  # vLLM's default 8000
        ({"command": ["sh", "-c", "exec vllm serve org/m --port $PORT"]}, False),
        ({"command": [*BASE, "--port", "http"]}, False),  # vLLM refuses to start
        ({"command": [*BASE, "--uds", "/tmp/v.sock"]}, False),  # no TCP port at all
    ],
    ids=["flag", "default", "shell variable", "not an integer", "uds"],
)
def test_the_port_is_known_only_when_the_command_line_fixes_it(
    container: dict, known: bool
) -> None:
    assert inspect(container).port_known is known


def test_positional_model_after_o3() -> None:
    assert inspect({"command": ["vllm", "serve", "-O3", "org/m"]}).model == "org/m"


def test_positional_model_after_a_boolean_flag() -> None:
    server = inspect({"command": ["vllm", "serve", "--enable-lora", "org/m", "--port", "8001"]})
    assert (server.model, server.enable_lora, server.port) == ("org/m", True, 8001)


@pytest.mark.parametrize(
    ("values", "modules"),
    [
        # cli_args.py LoRAParserAction: name=path when '=' and no ','; else JSON.
        (["a=/p/a", "b=/p/b"], [("a", "/p/a"), ("b", "/p/b")]),
        (['{"name": "a", "path": "/p/a", "base_model_name": "m"}'], [("a", "/p/a")]),
        (["a=/p/a", '{"name":"b","path":"/p/b"}'], [("a", "/p/a"), ("b", "/p/b")]),
        (["", "a=/p/a"], [("a", "/p/a")]),  # empty entries are skipped
    ],
)
def test_lora_modules(values: list[str], modules: list[tuple[str, str]]) -> None:
    server = inspect({"command": [*BASE, "--enable-lora", "--lora-modules", *values]})
    assert [(m.name, m.path) for m in server.lora_modules] == modules


def test_repeated_lora_modules_drop_the_earlier_adapters() -> None:
    server = inspect(
        {"command": [*BASE, "--enable-lora", "--lora-modules", "a=/a", "--lora_modules", "b=/b"]}
    )
    assert [m.name for m in server.lora_modules] == ["b"]
    assert any("a not served" in p for p in server.problems)


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    ("value", "on"),
    # vllm/envs.py (0.8.5 to 0.34): value.strip().lower() in ("1", "true").
    [
        ("1", True),
        ("true", True),
        ("True", True),
        (" TRUE ", True),
        ("yes", False),
        ("0", False),
        ("", False),
    ],
)
def test_runtime_lora_updating(value: str, on: bool) -> None:
    env = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": value}]
    assert inspect({"command": BASE, "env": env}).runtime_lora_updating is on


def test_runtime_lora_updating_sources() -> None:
    name = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
    from_cm = {"command": BASE, "envFrom": [{"configMapRef": {"name": "env"}}]}
    assert inspect(from_cm).runtime_lora_updating is None  # ConfigMap not given
    assert inspect(from_cm, configmaps={"env": {name: "true"}}).runtime_lora_updating is True
    assert inspect(from_cm, configmaps={"env": {}}).runtime_lora_updating is False
    secret = {
        "command": BASE,
        "env": [{"name": name, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    }
    assert inspect(secret).runtime_lora_updating is None
    # The kubelet expands $(VAR) in values: unknown to the check.
    ref = {"command": BASE, "env": [{"name": name, "value": "$(ON)"}]}
    assert inspect(ref).runtime_lora_updating is None
    # env beats envFrom; the last env entry of a name wins (kubelet).
    both = {**from_cm, "env": [{"name": name, "value": "true"}, {"name": name, "value": "0"}]}
    assert inspect(both, configmaps={"env": {name: "true"}}).runtime_lora_updating is False
    # A sh -c script's own assignment wins over the container env.
    shell = {
        "command": ["sh", "-c", f"export {name}=1; exec vllm serve m"],
        "env": [{"name": name, "value": "0"}],
    }
    assert inspect(shell).runtime_lora_updating is True


@pytest.mark.parametrize(
    ("container", "described"),
    [
        ({"command": BASE}, None),
        # api_server.py: `args.api_key or [envs.VLLM_API_KEY]`, empty keys dropped.
        ({"command": [*BASE, "--api-key", "k1", "k2"]}, {"from": "args"}),
        (
            {"command": BASE, "env": [{"name": "VLLM_API_KEY", "value": "k"}]},
            {"from": "env", "name": "VLLM_API_KEY"},
        ),
        ({"command": BASE, "env": [{"name": "VLLM_API_KEY", "value": ""}]}, None),
        (
            {
                "command": BASE,
                "env": [
                    {
                        "name": "VLLM_API_KEY",
                        "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}},
                    }
                ],
            },
            {"from": "secret", "secret": "api", "key": "token"},
        ),
        (
            {"command": BASE, "envFrom": [{"secretRef": {"name": "all"}}]},
            {"from": "envFrom", "secret": "all", "key": "VLLM_API_KEY", "maybe": True},
        ),
        # --api-key given: VLLM_API_KEY is not read at all.
        (
            {"command": [*BASE, "--api-key", "k"], "env": [{"name": "VLLM_API_KEY", "value": "x"}]},
            {"from": "args"},
        ),
        # [""] is truthy for `args.api_key or [...]`, then the empty key is dropped: no key.
        (
            {"command": [*BASE, "--api-key", ""], "env": [{"name": "VLLM_API_KEY", "value": "x"}]},
            None,
        ),
    ],
)
def test_api_key_source(container: dict, described: dict | None) -> None:
    server = inspect(container)
    got = server.api_key.describe() if server.api_key else None
    assert got == described
    assert "k1" not in str(server.report()) and "'k'" not in str(server.report())


def test_api_key_value_is_resolved_but_never_reported() -> None:
    server = inspect({"command": [*BASE, "--api-key", "sekret"]})
    assert vs.resolve_api_key(server.api_key, {}) == "sekret"
    assert "sekret" not in repr(server) and "sekret" not in str(server.report())
    env = [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}]
    from_secret = inspect({"command": BASE, "env": env})
    assert vs.resolve_api_key(from_secret.api_key, {"api": {"token": "t0k"}}) == "t0k"


# ------------------------------------------------------------------ --config


CFG = {"name": "cfg", "configMap": {"name": "vllm-config"}}
MOUNT = [{"name": "cfg", "mountPath": "/etc/vllm"}]


def with_config(args: list[str], yaml_text: str | None, volumes: list | None = None, mounts=MOUNT):
    dep = deployment(
        {"name": "vllm", "command": ["vllm", "serve", "org/m", *args], "volumeMounts": mounts},
        volumes=[CFG] if volumes is None else volumes,
    )
    cms = {} if yaml_text is None else {"vllm-config": {"cfg.yaml": yaml_text}}
    return vs.inspect(dep, configmaps=cms)


def test_config_file_values_with_cli_precedence() -> None:
    # argparse_utils.py _pull_args_from_config: the file's flags go before the CLI's.
    text = "enable-lora: true\nmax_lora_rank: 64\nmax-loras: 2\nlora-modules: [a=/a, b=/b]\n"
    server = with_config(["--config", "/etc/vllm/cfg.yaml", "--max-loras", "3"], text)
    assert server.enable_lora and server.max_lora_rank == 64 and server.max_loras == 3
    assert [m.name for m in server.lora_modules] == ["a", "b"]
    assert server.config_file == "/etc/vllm/cfg.yaml" and not server.problems


def test_config_file_bool_false() -> None:
    # 0.34 load_config_file: false -> --no-KEY; 0.11: dropped. Either way LoRA stays off here.
    server = with_config(["--config", "/etc/vllm/cfg.yaml"], "enable-lora: false\n")
    assert not server.enable_lora
    on = with_config(["--enable-lora", "--config", "/etc/vllm/cfg.yaml"], "enable-lora: false\n")
    assert on.enable_lora  # CLI > YAML


@pytest.mark.parametrize(
    ("args", "text", "volumes", "mounts", "needle"),
    [
        (["--config", "/etc/vllm/cfg.yaml"], None, None, MOUNT, "could not read"),
        (["--config", "/opt/cfg.yaml"], "", None, MOUNT, "not in a ConfigMap volume"),
        (
            ["--config", "/etc/vllm/cfg.yaml"],
            "",
            [{"name": "cfg", "emptyDir": {}}],
            MOUNT,
            "volume cfg is emptyDir",
        ),
        (["--config", "/etc/vllm/cfg.json"], "", None, MOUNT, "only .yaml/.yml"),
        (["--config=/etc/vllm/cfg.yaml"], "", None, MOUNT, "two words"),
        (["--config", "/etc/vllm/cfg.yaml"], "[1, 2]", None, MOUNT, "not a YAML mapping"),
        (["--config", "/etc/vllm/cfg.yaml"], "a: [1\n", None, MOUNT, "not valid YAML"),
        # Aliases could expand a small ConfigMap into gigabytes: not read.
        (
            ["--config", "/etc/vllm/cfg.yaml"],
            "x: &a [1, 2]\nlora-modules: *a\n",
            None,
            MOUNT,
            "aliases",
        ),
    ],
)
def test_config_file_problems(args, text, volumes, mounts, needle) -> None:
    server = with_config(args, text, volumes, mounts)
    assert any(needle in p for p in server.problems), server.problems


def test_config_file_through_subpath_and_items() -> None:
    vol = {
        "name": "cfg",
        "configMap": {"name": "vllm-config", "items": [{"key": "cfg.yaml", "path": "serve.yaml"}]},
    }
    mounts = [{"name": "cfg", "mountPath": "/etc/vllm/serve.yaml", "subPath": "serve.yaml"}]
    server = with_config(["--config", "/etc/vllm/serve.yaml"], "max-loras: 4\n", [vol], mounts)
    assert server.max_loras == 4 and not server.problems
    assert vs.configmaps_needed(
        deployment(
            {
                "name": "v",
                "command": ["vllm", "serve", "m", "--config", "/etc/vllm/serve.yaml"],
                "volumeMounts": mounts,
            },
            volumes=[vol],
        )
    ) == ["vllm-config"]


def test_the_port_from_the_config_file_is_told_apart() -> None:
    from_file = with_config(["--config", "/etc/vllm/cfg.yaml"], "port: 9100\n")
    assert (from_file.port, from_file.port_from_config) == (9100, True)
    cli = with_config(["--config", "/etc/vllm/cfg.yaml", "--port", "9000"], "port: 9100\n")
    assert (cli.port, cli.port_from_config) == (9000, False)  # the command line wins


def test_the_configmaps_read_are_those_of_every_vllm_container_only() -> None:
    """What the watch of ConfigMaps wakes AdapterDeployments for: any vLLM container may be
    target.container; a sidecar's ConfigMaps never feed the server model."""
    dep = deployment(
        {"name": "proxy", "image": "envoy:1", "envFrom": [{"configMapRef": {"name": "proxy"}}]},
        {
            "name": "a",
            "command": ["vllm", "serve", "m", "--config", "/etc/vllm/cfg.yaml"],
            "volumeMounts": MOUNT,
        },
        {
            "name": "b",
            "command": ["vllm", "serve", "n"],
            "env": [
                {
                    "name": "VLLM_API_KEY",
                    "valueFrom": {"configMapKeyRef": {"name": "keys", "key": "k"}},
                },
                {"name": "OTHER", "valueFrom": {"configMapKeyRef": {"name": "unread", "key": "k"}}},
            ],
        },
        volumes=[CFG],
    )
    assert vs.configmaps_needed(dep) == ["vllm-config"]  # the first vLLM container's
    assert vs.configmaps_read(dep) == ["keys", "vllm-config"]


# ------------------------------------------------------------------ problems


@pytest.mark.parametrize(
    ("container", "needle"),
    [
        # config/lora.py: max_cpu_loras < max_loras raises.
        (
            {"command": [*BASE, "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"]},
            "--max-loras 4 is above --max-cpu-loras 2: vLLM refuses to start",
        ),
        # 0.34 config/lora.py MaxLoRARanks.
        (
            {"command": [*BASE, "--enable-lora", "--max-lora-rank", "24"]},
            "--max-lora-rank 24 is not one of",
        ),
        # 0.11 config/lora.py possible_max_ranks has no 1.
        (
            {
                "image": "vllm/vllm-openai:v0.11.0",
                "args": ["m", "--enable-lora", "--max-lora-rank", "1"],
            },
            "--max-lora-rank 1",
        ),
        # BooleanOptionalAction takes no value.
        ({"command": [*BASE, "--enable-lora=true"]}, "takes no value"),
        ({"command": [*BASE, "--lora-modules", "oops"]}, "not name=path or JSON"),
        ({"command": [*BASE, "--max-loras", "many"]}, "is not an integer"),
        # cli/serve.py: runtime updating with api_server_count > 1 raises (0.11 to 0.34).
        (
            {
                "command": [*BASE, "--data-parallel-size", "2"],
                "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "1"}],
            },
            "2 API-server processes",
        ),
        ({"command": [*BASE, "--enable-lorra"]}, "not an option"),
        ({"command": [*BASE, "extra"]}, "unrecognized arguments extra"),
        # Only cli/serve.py reads model_tag; api_server.py takes the model from --model.
        (
            {"command": ["python3", "-m", "vllm.entrypoints.openai.api_server", "org/m"]},
            "ignores the positional model org/m",
        ),
        (
            {"command": ["sh", "-c", "vllm serve m --max-loras $N"]},
            "depends on the shell environment",
        ),
        ({"command": [*BASE, "--uds", "/tmp/s"]}, "Unix socket"),
        # 0.20+ argparse_utils.py: --served-model-name without the model first raises.
        (
            {"command": ["vllm", "serve", "--enable-lora", "org/m", "--served-model-name", "x"]},
            "needs the model as its first argument",
        ),
        # 0.11 argparse (utils/__init__.py): `vllm serve --model` raises.
        (
            {"image": "vllm/vllm-openai:v0.11.0", "command": ["vllm", "serve", "--model", "m"]},
            "refuses --model",
        ),
    ],
)
def test_problems(container: dict, needle: str) -> None:
    server = inspect(container)
    assert any(needle in p for p in server.problems), server.problems


def test_api_server_count_defaults() -> None:
    # 0.34 cli/serve.py: api_server_count defaults to data_parallel_size; 0.11 defaulted to 1.
    assert inspect({"command": [*BASE, "-dp", "4"]}).api_server_count == 4
    assert (
        inspect(
            {"image": "vllm/vllm-openai:v0.11.0", "command": [*BASE, "-dp", "4"]}
        ).api_server_count
        == 1
    )
    assert (
        inspect({"command": [*BASE, "-dp", "4", "--api-server-count", "1"]}).api_server_count == 1
    )
    assert (
        inspect({"command": [*BASE, "-dp", "4", "--data-parallel-external-lb"]}).api_server_count
        == 1
    )
    api = {
        "command": [
            "python",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "m",
            "-dp",
            "4",
        ]
    }
    assert inspect(api).api_server_count == 1


def test_report_shape() -> None:
    server = inspect(
        {
            "image": "vllm/vllm-openai:v0.11.0",
            "args": ["m", "--enable-lora", "--lora-modules", "a=/a"],
        }
    )
    report = server.report()
    for key in (
        "vllm", "container", "enableLora", "maxLoraRank", "maxLoras", "maxCpuLoras",
        "loraModules", "runtimeLoraUpdating", "apiKey", "port", "problems",
    ):  # fmt: skip
        assert key in report
    assert report["loraModules"] == [{"name": "a", "path": "/a"}]


# ------------------------------------------------------------------ editing


EDITABLE = [
    {"command": ["vllm", "serve"], "args": ["org/m", "--enable-lora", "--lora-modules", "x=/x"]},
    {
        "image": "vllm/vllm-openai:v0.11.0",
        "args": ["org/m", "--enable_lora", "--lora_modules=x=/x"],
    },
    {
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": ["--model", "org/m", "--lora-modules", '{"name":"x","path":"/x"}', "--enable-lora"],
    },
    {
        "command": ["/bin/sh", "-c"],
        "args": [
            "exec vllm serve org/m \\\n  --enable-lora --lora-modules x=/x 2>&1 | tee /tmp/log"
        ],
    },
    {
        "command": [
            "bash",
            "-c",
            'cd /w && VAR="$HOME" vllm serve "org/m" --no-enable-lora --lora_modules x=/x --max-cpu-loras 1 && echo done',
        ]
    },
    # Two spellings: vLLM serves only y, but the user listed both.
    {"command": ["vllm", "serve", "org/m", "--lora-modules", "x=/x", "--lora_modules", "y=/y"]},
]
LISTED = [{"x"}, {"x"}, {"x"}, {"x"}, {"x"}, {"x", "y"}]


def _tokens(container: dict) -> list[str]:
    loc = va.locate(container)
    assert loc is not None
    return [w.value for w in loc.argv]


def _spellings(tokens: list[str], dest_flags: set[str]) -> int:
    return sum(
        1 for t in tokens if va.resolve_option(va.normalize_flag(t.split("=", 1)[0])) in dest_flags
    )


@pytest.mark.parametrize(("container", "listed"), zip(EDITABLE, LISTED, strict=True))
def test_edit_round_trips(container: dict, listed: set[str]) -> None:
    before = va.parse_container(container)
    out = va.set_lora_module(container, va.LoraModule("new", "/adapters/new"))
    out = va.ensure_enable_lora(out)
    out = va.set_max_lora_rank(out, 64)
    out = va.set_max_loras(out, 3)
    after = va.parse_container(out)
    assert after.model == before.model == "org/m"
    assert after.enable_lora and after.max_lora_rank == 64 and after.max_loras == 3
    assert after.effective_max_cpu_loras >= 3 and not after.problems, after.problems
    # No adapter the user listed is lost, under any spelling.
    assert {m.name for m in after.lora_modules} == listed | {"new"}
    tokens = _tokens(out)
    assert _spellings(tokens, {"--lora-modules"}) == 1
    assert _spellings(tokens, {"--enable-lora", "--no-enable-lora", "--disable-lora"}) == 1
    assert _spellings(tokens, {"--max-lora-rank"}) == 1
    removed = va.remove_lora_module(out, "new")
    assert {m.name for m in va.parse_container(removed).lora_modules} == listed
    assert va.parse_container(removed).model == "org/m"


def test_shell_edit_keeps_the_rest_of_the_script() -> None:
    script = (
        'cd /w && VAR="$HOME" exec vllm serve "$MODEL" --enable-lora --max-loras 1 2>&1 | tee /log'
    )
    out = va.set_max_loras({"command": ["sh", "-c", script]}, 2)
    assert out["command"][2] == script.replace("--max-loras 1", "--max-loras 2")
    added = va.set_lora_module(out, va.LoraModule("a b", "/p/a b"))
    assert "--lora-modules 'a b=/p/a b' 2>&1 | tee /log" in added["command"][2]
    assert [m.name for m in va.parse_container(added).lora_modules] == ["a b"]


def test_edits_refuse_what_they_cannot_do_safely() -> None:
    dynamic = {"command": ["sh", "-c", "vllm serve m --enable-lora --lora-modules $ADAPTERS"]}
    with pytest.raises(va.ServerArgsError, match="shell expansions"):
        va.set_lora_module(dynamic, va.LoraModule("a", "/a"))
    unread = {"command": ["vllm", "serve", "m", "--config", "/etc/vllm/cfg.yaml"]}
    with pytest.raises(va.ServerArgsError, match="only once it can read it"):
        va.set_lora_module(unread, va.LoraModule("a", "/a"))
    with pytest.raises(va.ServerArgsError, match="does not run the vLLM"):
        va.set_max_loras({"command": ["python", "app.py"]}, 2)


def test_edit_with_config_keeps_the_files_adapters() -> None:
    dep = deployment(
        {
            "name": "vllm",
            "command": ["vllm", "serve", "m", "--config", "/etc/vllm/cfg.yaml"],
            "volumeMounts": MOUNT,
        },
        volumes=[CFG],
    )
    cms = {
        "vllm-config": {"cfg.yaml": "enable-lora: true\nlora-modules: [a=/a]\nmax-cpu-loras: 1\n"}
    }
    ctx = vs.edit_context(dep, configmaps=cms)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    out = va.set_lora_module(container, va.LoraModule("b", "/b"), ctx)
    out = va.set_max_loras(out, 2, ctx)
    dep["spec"]["template"]["spec"]["containers"][0] = out
    server = vs.inspect(dep, configmaps=cms)
    assert [m.name for m in server.lora_modules] == ["a", "b"]
    assert server.max_loras == 2 and server.max_cpu_loras == 2 and not server.problems


# ------------------------------------------------------------------ compatibility check


def test_compatibility_reads_the_config_file_or_refuses() -> None:
    from finetune_operator.builders import serving as sb
    from finetune_operator.planners import adapterdeployment as p

    spec = p.AdapterDeploymentSpec.model_validate(
        {
            "adapterName": "support",
            "source": {"fineTuneJobRef": {"name": "f"}},
            "target": {"deployment": "llm"},
        }
    )
    ref = sb.AdapterRef("support", "pvc://out/a", "sha256:" + "1" * 64, "hf://org/m", 32)
    dep = deployment(
        {
            "name": "vllm",
            "command": ["vllm", "serve", "org/m", "--config", "/etc/vllm/cfg.yaml"],
            "volumeMounts": MOUNT,
        },
        volumes=[CFG],
    )
    unread = p.check_compatible(spec, "adep", dep, ref)
    assert unread.reason == "ServerConfigUnreadable" and "vllm-config" in unread.message
    cms = {"vllm-config": {"cfg.yaml": "enable-lora: true\nmax-lora-rank: 32\n"}}
    assert p.check_compatible(spec, "adep", dep, ref, configmaps=cms).ok
    low = {"vllm-config": {"cfg.yaml": "enable-lora: true\n"}}
    assert p.check_compatible(spec, "adep", dep, ref, configmaps=low).reason == "RankTooLarge"
    bad = deployment(
        {
            "name": "vllm",
            "command": ["vllm", "serve", "org/m", "--enable-lora", "--lora-modules", "x"],
        }
    )
    assert p.check_compatible(spec, "adep", bad, ref).reason == "ServerArgsInvalid"


def test_shell_edit_keeps_redirections_and_continuations() -> None:
    script = "vllm serve m > /log \\\n  --lora-modules a=/a b=/b \\\n  --port 8001"
    out = va.remove_lora_module({"command": ["sh", "-c", script]}, "a")
    assert out["command"][2] == "vllm serve m > /log \\\n  --lora-modules b=/b \\\n  --port 8001"
    parsed = va.parse_container(out)
    assert (parsed.model, parsed.port, [m.name for m in parsed.lora_modules]) == ("m", 8001, ["b"])


def test_rollout_patch_edits_the_vllm_container_behind_a_sidecar() -> None:
    from finetune_operator.builders import serving as sb

    dep = deployment(
        {"name": "proxy", "image": "envoy:1", "args": ["--config", "/etc/envoy.yaml"]},
        {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "args": ["org/m", "--enable-lora"]},
    )
    dep["metadata"]["resourceVersion"] = "7"
    ref = sb.AdapterRef("support", "pvc://out/support", "sha256:" + "1" * 64)
    ops = sb.rollout_patch(dep, None, "support", ref, owner="adep", fetch_image="f:1")
    assert {"op": "test", "path": "/spec/template/spec/containers/1/name", "value": "vllm"} in ops
    args = next(op["value"] for op in ops if op["path"] == "/spec/template/spec/containers/1/args")
    assert args[:2] == ["org/m", "--enable-lora"] and args[2] == "--lora-modules"


def test_problems_never_echo_a_value_that_may_be_a_key() -> None:
    server = inspect({"command": [*BASE, "--api-keyy=s3cr3t-value", "--enable-lora=s3cr3t-value"]})
    assert len(server.problems) == 2
    assert "s3cr3t" not in str(server.problems)
    long = inspect({"command": [*BASE, "--lora-modules", "x" * 5000]})
    assert all(len(p) < 400 for p in long.problems)


WORDS = [
    "--enable-lora", "--no-enable-lora", "--disable-lora", "--enable_lora", "--enable-lora=1",
    "--max-loras", "--max_loras=2", "3", "0", "-1", "--max-cpu-loras", "--max-lora-rank", "64",
    "--lora-modules", "--lora_modules=a=/a", "a=/a", "b=/b", '{"name":"c","path":"/c"}',
    "--port", "8000", "m", "--served-model-name", "n", "--api-key", "k", "--config",
    "/etc/v/c.yaml", "-O3", "--enforce-eager", "-dp", "2", "--model", "$X", "=", "-",
    "--max-lora-r", "32",
]  # fmt: skip
SHELL = ["&&", "|", ";", "exec", "2>&1", ">", "/log", "\\\n", "A=1"]


def _random_container(rng) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 10))]
    kind = rng.randrange(4)
    if kind == 0:
        return {"command": ["vllm", "serve", *words]}
    if kind == 1:
        return {"image": "vllm/vllm-openai:v0.34.0", "args": words}
    if kind == 2:
        return {"command": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "args": words}
    bits = [rng.choice([rng.choice(WORDS), rng.choice(SHELL)]) for _ in range(rng.randint(0, 12))]
    return {"command": ["sh", "-c", "vllm serve " + " ".join(bits)]}


def _edits(ctx: va.EditContext) -> list:
    """Each edit with what vLLM must read afterwards."""
    return [
        (lambda c: va.set_lora_module(c, va.LoraModule("new", "/n"), ctx), lambda p: p.module("new")),
        (lambda c: va.remove_lora_module(c, "a", ctx), lambda p: p.module("a") is None),
        (lambda c: va.ensure_enable_lora(c, ctx), lambda p: p.enable_lora),
        (lambda c: va.set_max_loras(c, 4, ctx), lambda p: p.max_loras == 4 and p.effective_max_cpu_loras >= 4),
        (lambda c: va.set_max_lora_rank(c, 64, ctx), lambda p: p.max_lora_rank == 64),
    ]  # fmt: skip


def test_edits_do_what_they_say_or_refuse_on_random_command_lines() -> None:
    import random

    rng = random.Random(7)
    done = 0
    for _ in range(300):
        container = {
            "name": "v",
            **_random_container(rng),
            "volumeMounts": [{"name": "c", "mountPath": "/etc/v"}],
        }
        dep = deployment(container, volumes=[{"name": "c", "configMap": {"name": "cm"}}])
        cms = {
            "cm": {
                "c.yaml": rng.choice(
                    ["enable-lora: true\nlora-modules: [z=/z]\n", "max-cpu-loras: 2\n", ""]
                )
            }
        }
        ctx = vs.edit_context(dep, configmaps=cms)
        edits = _edits(ctx)
        for edit, holds in edits:
            try:
                out = edit(container)
            except va.ServerArgsError:
                continue  # refused with a reason: allowed
            assert holds(va.parse_container(out, read_config=ctx.read_config)), (container, out)
            done += 1
    assert done > 1000  # most random command lines are edited, not refused
