"""What the Comfy Registry and ComfyUI-Manager read from this repository, checked offline.

CI also runs comfy-cli's own `comfy node validate` (scripts/validate_registry.sh); these tests hold
the same rules without the network, plus the registry's documented ones that the CLI leaves to the
server (node id, X.Y.Z version, a fetchable square icon) and this pack's own (torch is never a
requirement). ComfyUI-Manager's install path itself is simulated by tests/test_install.py.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# What comfy-cli 1.23.0 accepts in each comma-separated part of requires-comfyui: an optional comparison,
# then major.minor.patch with an optional -suffix. Anything else is dropped with a warning, and the
# registry then shows no ComfyUI requirement at all.
COMPARISONS = ("==", ">=", "<=", "!=", "~=", "<>", ">", "<", "=")


def comfy_cli_accepts(part: str) -> bool:
    rest = next((part[len(op):] for op in COMPARISONS if part.startswith(op)), part).strip()
    return re.fullmatch(r"\d+\.\d+\.\d+(-[A-Za-z0-9]+)?", rest) is not None
TORCH = {"torch", "torchvision", "torchaudio", "xformers", "triton"}


def requirements_txt() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def test_node_id_follows_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name), "only alphanumerics, hyphens, underscores and periods"
    assert re.match(r"[A-Za-z]", name), "cannot start with a number or a special character"
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert name == name.lower()


def test_version_is_x_y_z_and_pep_440_and_the_changelogs_newest_release():
    version = PROJECT["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "the registry takes semantic X.Y.Z versions"
    assert str(Version(version)) == version
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == version, f"CHANGELOG.md's newest release {releases[:1]} is not {version}"
    assert [Version(v) for v in releases] == sorted((Version(v) for v in releases), reverse=True)


@pytest.mark.parametrize("text,accepted", [(">=0.3.64", True), ("0.3.75", True), (">=0.3.0,<0.40.0", True),
                                           ("==1.0.0-beta", True), (">=0.3", False), ("latest", False), ("^0.3.64", False)])
def test_the_requires_comfyui_rule_is_comfy_cli_s(text, accepted):
    assert all(comfy_cli_accepts(part.strip()) for part in text.split(",")) is accepted


def test_tool_comfy_has_what_publishing_needs():
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"])
    assert COMFY["DisplayName"].strip()
    for part in COMFY["requires-comfyui"].split(","):
        assert comfy_cli_accepts(part.strip()), f"comfy-cli would drop requires-comfyui: {part!r}"
    floor = re.search(r">=\s*(\d+\.\d+\.\d+)", COMFY["requires-comfyui"]).group(1)
    assert Version(floor) <= Version("0.3.75"), "the floor must not exclude the ComfyUI the tests run on"
    assert COMFY.get("includes", []) == []


def test_license_urls_and_classifiers_are_in_the_forms_comfy_cli_reads():
    license_ = PROJECT["license"]
    assert set(license_) in ({"text"}, {"file"}), 'license = {text = "..."} or {file = "..."}'
    assert license_.get("text", "GPL-3.0-or-later").startswith("GPL-3.0")  # the LICENSE file is the GPL v3
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    urls = PROJECT["urls"]
    assert set(urls) <= {"Homepage", "Documentation", "Repository", "Issues"}, "comfy-cli ignores other keys"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", urls["Repository"])
    for classifier in PROJECT.get("classifiers", []):
        if classifier.startswith("Operating System :: "):
            assert classifier.split(" :: ")[1] in {"Microsoft", "POSIX", "MacOS", "OS Independent"}
        if classifier.startswith("Environment ::"):
            assert classifier in {f"Environment :: {a}" for a in ("GPU :: NVIDIA CUDA", "GPU :: AMD ROCm",
                                                                  "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                                                                  "GPU :: Apple Metal")}


def test_icon_is_a_raw_url_of_a_committed_square_png_drawn_by_the_script():
    owner_repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", COMFY["Icon"])
    assert match, f"Icon should be the raw URL of a file on the main branch of {owner_repo}, got {COMFY['Icon']!r}"
    path = REPO / match.group(1)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", match.group(1)], cwd=REPO, capture_output=True)
    if (REPO / ".git").exists():
        assert tracked.returncode == 0, f"{match.group(1)} is not committed, so the URL would not resolve"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == image.height <= 400
        pixels = image.convert("RGB").tobytes()
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_icon", REPO / "scripts" / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    assert make_icon.icon().tobytes() == pixels, "docs/icon.png differs from what scripts/make_icon.py draws"


def test_no_requirement_ever_touches_torch():
    # ComfyUI-Manager pip-installs requirements.txt into the user's ComfyUI environment: a torch line
    # there could replace the user's CUDA build.
    from_file = requirements_txt()
    assert not {r.name.lower() for r in from_file} & TORCH
    dependencies = [Requirement(d) for d in PROJECT["dependencies"]]
    assert not {r.name.lower() for r in dependencies} & TORCH
    assert sorted(map(str, from_file)) == sorted(map(str, dependencies)), \
        "requirements.txt (ComfyUI-Manager) and [project].dependencies (the registry) must ask for the same"
    assert not any(line.strip().startswith(("-", "--")) for line in (REPO / "requirements.txt").read_text().splitlines()), \
        "no pip options (index URLs, -e, -r) in requirements.txt"


@pytest.fixture(scope="module")
def tracked_python():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    return [REPO / f for f in files if (REPO / f).is_file()]


def test_no_exec_eval_or_semicolon_statements_as_comfy_cli_s_ruff_check_flags(tracked_python):
    # comfy node validate runs ruff with S102 (exec), S307 (eval), E702 (`a; b`); "soon an error".
    found = []
    for path in tracked_python:
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ";":
                found.append(f"{path.relative_to(REPO)}:{token.start[0]} ;")
    assert not found, found
