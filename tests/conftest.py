"""Tests run against a real ComfyUI (scripts/setup.sh makes one) on the CPU."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Appended: the pack's folders (nodes/ above all) must never shadow ComfyUI's modules of the same name.
sys.path.append(str(REPO))
sys.path.append(str(REPO / "tests"))

from maskattn_comfy import host  # noqa: E402

COMFYUI = host.boot(cpu=True)
from comfy_kit import FIXTURES  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The authors' reference vectors, in the repository (tests/fixtures/official/README.md)."""
    return FIXTURES


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """The pack loaded the way ComfyUI loads it: a folder in custom_nodes/, through nodes.load_custom_node."""
    import nodes

    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    link = custom_nodes / "ComfyUI-MaskAttn"
    link.symlink_to(REPO, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(link))), "ComfyUI failed to load the pack"
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture
def gate_folder(tmp_path, pack):
    """An empty models/maskattn folder that ComfyUI's folder_paths will list."""
    import folder_paths

    folder = tmp_path / "maskattn"
    folder.mkdir()
    paths, exts = folder_paths.folder_names_and_paths["maskattn"]
    folder_paths.folder_names_and_paths["maskattn"] = ([str(folder)] + paths, exts)
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    yield folder
    folder_paths.folder_names_and_paths["maskattn"] = (paths, exts)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU, two OpenMP threads waiting on each other made steps 30x slower."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def attention_backend(request):
    """Switch ComfyUI's optimized attention to one named backend for a test, then back."""
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention, attention.optimized_attention_masked
    fn = {"pytorch": attention.attention_pytorch, "split": attention.attention_split,
          "sub_quad": attention.attention_sub_quad, "basic": attention.attention_basic}[request.param]
    attention.optimized_attention = attention.optimized_attention_masked = fn
    yield request.param
    attention.optimized_attention, attention.optimized_attention_masked = saved


def pytest_report_header(config):
    return f"ComfyUI {host.comfyui_version(COMFYUI)} at {COMFYUI}"
