"""The pack as a user meets it: ComfyUI's real frontend (the comfyui-frontend-package the server
serves) in headless Chromium. Screenshots go to tests/artifacts/browser/ (printed at the start).

Chromium is Debian's `chromium` (or $MASKATTN_CHROMIUM); without it these tests are skipped.
"""

import importlib.metadata
import json
import os
import shutil
import sys
import urllib.request

import pytest

from browser_kit import ARTIFACTS, TIMEOUT_MS, Frontend, chromium_executable, write_settings
from conftest import COMFYUI, REPO
from ipadapter_kit import SNAPSHOT as IPADAPTER_SNAPSHOT
from ipadapter_kit import unpack as unpack_ipadapter

sys.path.append(str(REPO / "scripts"))
from headless import ComfyServer  # noqa: E402

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
CHROMIUM = chromium_executable()
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser tests: .ci/run installs Debian's chromium (or set MASKATTN_CHROMIUM)")
FRONTEND = importlib.metadata.version("comfyui-frontend-package")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no Chromium: apt-get install chromium, or set MASKATTN_CHROMIUM to its executable"),
    # The selectors follow the frontend's DOM, which changes between its releases.
    pytest.mark.skipif(not FRONTEND.startswith(("1.32.", "1.49.")),
                       reason=f"written against comfyui-frontend-package 1.32 and 1.49 (ComfyUI 0.3.75's and "
                              f"0.33.0's); this host serves {FRONTEND}"),
]

PACK_NODES = {"MaskAttnLoader": "MaskAttn Loader", "MaskAttnRegion": "MaskAttn Region",
              "MaskAttnVisualize": "Visualize Mask", "MaskAttnShapesCheckpoint": "MaskAttn Shapes Checkpoint"}
SHIPPED_GATES = sorted(p.name for p in (REPO / "maskattn_shapes" / "gates").glob("*.safetensors"))
CORRUPT = "corrupt_gates.safetensors"
EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
# Example workflows that also need another pack: installed beside this one when its snapshot is here.
NEEDS = {"maskattn_ipadapter": IPADAPTER_SNAPSHOT}


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(f"browser screenshots: {ARTIFACTS}")
    base = tmp_path_factory.mktemp("comfy-browser")
    srv = ComfyServer(COMFYUI, base)
    gates = base / "models" / "maskattn"
    shutil.copyfile(REPO / "maskattn_shapes" / "gates" / SHIPPED_GATES[0], gates / "my_gates.safetensors")
    (gates / CORRUPT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken")
    (gates / "notes.txt").write_text("not a gate file: the Loader must not list it")
    write_settings(base)
    if IPADAPTER_SNAPSHOT.is_file():
        unpack_ipadapter(base / "custom_nodes")
    (base / "input").mkdir()
    shutil.copyfile(REPO / "docs" / "shapes_demo.png", base / "input" / "example.png")  # LoadImage's file
    with srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root; the resolver rule keeps every name but the test server unresolved
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def tab(browser, server):
    tab = Frontend(browser, server.url).open()
    yield tab
    tab.close()


@pytest.fixture
def frontend(tab, request):
    """The module's tab, with no dialog, menu or side panel left open; reloaded after a failed test."""
    failed = request.session.testsfailed
    tab.reset()
    yield tab
    if request.session.testsfailed != failed:
        tab.open()


def node_info(server, node_id: str) -> dict:
    return server.get(f"/object_info/{node_id}")[node_id]


def load_template(frontend, name: str):
    """Open the template browser, pick the pack's category and the template, wait until its graph is drawn."""
    page = frontend.page
    page.evaluate("() => window.app.graph.nodes.forEach(n => { n.maskattnStale = true })")
    frontend.command("Comfy.BrowseTemplates")
    browser = page.get_by_role("dialog").filter(has=page.get_by_text("Model Filter"))
    browser.get_by_text("ComfyUI-MaskAttn", exact=True).click()
    browser.locator(f'h3[title="{name}"]').click()
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    types = sorted(node["type"] for node in workflow["nodes"])
    page.wait_for_function("(types) => !window.app.graph.nodes.some(n => n.maskattnStale) && JSON.stringify("
                           "window.app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(types)", arg=types)
    browser.wait_for(state="detached")
    frontend.fit_view()


def test_the_server_serves_comfyuis_frontend_package(server, frontend):
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        assert "<html" in response.read().decode().lower()
    served = frontend.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert served == FRONTEND


def test_node_library_lists_the_pack_nodes_under_maskattn_with_their_descriptions(server, frontend):
    page = frontend.page
    page.get_by_role("button", name="Node Library").click()
    page.get_by_role("treeitem", name="MaskAttn", exact=True).click()
    leaves = page.get_by_role("treeitem", level=2)  # only the MaskAttn folder is open
    leaves.first.wait_for()
    names = leaves.evaluate_all("els => els.map(e => e.getAttribute('aria-label') || e.innerText.trim())")
    assert sorted(names) == sorted(PACK_NODES.values())
    for node_id in ["MaskAttnShapesCheckpoint", "MaskAttnVisualize", "MaskAttnLoader", "MaskAttnRegion"]:
        info = node_info(server, node_id)
        assert info["category"] == "MaskAttn"
        leaves.filter(has_text=info["display_name"]).hover(force=True)  # 1.49's virtual list never settles
        page.get_by_text(info["description"], exact=True).wait_for()  # the node's preview card
    frontend.screenshot("node_library")


def test_node_search_finds_the_pack_nodes_in_their_category(server, frontend):
    page = frontend.page
    frontend.command("Workspace.SearchBox.Toggle")
    page.locator(".comfy-vue-node-search-box input, input[placeholder='Add a node...']").first.fill("MaskAttn")
    page.wait_for_function("(names) => { const texts = [...document.querySelectorAll('[role=option]')]"
                           ".map(o => o.innerText.split('\\n')[0].trim()); return names.every(n => texts.includes(n)) }",
                           arg=list(PACK_NODES.values()))
    found = {}
    for text in page.get_by_role("option").all_inner_texts():
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines:
            found[lines[0]] = lines[1:]
    for name in PACK_NODES.values():
        assert name in found and found[name][0] == "MaskAttn", found
    page.get_by_text(node_info(server, "MaskAttnLoader")["description"]).first.wait_for()  # preview or the row itself
    frontend.screenshot("node_search")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflow_loads_from_the_template_browser(server, frontend, name):
    if name in NEEDS and not NEEDS[name].is_file():
        pytest.skip(f"{name} needs the pack in {NEEDS[name]}")
    thumbnail = REPO / "example_workflows" / f"{name}.jpg"
    page = frontend.page
    mark = len(frontend.console)
    load_template(frontend, name)
    registered = page.evaluate("() => window.app.graph.nodes.filter(n => !window.LiteGraph.registered_node_types[n.type])"
                               ".map(n => n.type)")
    assert registered == []
    assert frontend.open_dialogs() == []  # no missing-node (or any other) dialog
    for node_id in PACK_NODES:
        if node_id in frontend.node_types():
            spec = node_info(server, node_id)["input"]
            widgets = page.evaluate("(t) => window.app.graph.nodes.find(n => n.type === t).widgets?.map(w => w.name) ?? []",
                                    node_id)
            for widget_input, value in {**spec["required"], **spec.get("optional", {})}.items():
                if isinstance(value[0], list) or value[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    assert widget_input in widgets, (node_id, widget_input, widgets)
    frontend.screenshot(f"template_{name}")
    frontend.thumbnail(name)
    assert thumbnail.is_file(), (f"the template browser asks for {thumbnail.name} (a 404 in the console): copy "
                                 f"{ARTIFACTS / thumbnail.name}, the graph as drawn here, or a picture it makes")
    assert frontend.errors_since(mark) == []


def test_loader_widgets_show_their_tooltips_on_the_canvas(server, frontend):
    load_template(frontend, "maskattn_shapes")
    tooltip = frontend.page.locator(".node-tooltip")
    for widget, spec in node_info(server, "MaskAttnLoader")["input"]["required"].items():
        if widget == "model":
            continue
        frontend.hover(*frontend.widget_point("MaskAttnLoader", widget))
        playwright_api.expect(tooltip).to_have_text(spec[1]["tooltip"], timeout=TIMEOUT_MS)
        if widget == "gate_name":
            frontend.screenshot("loader_tooltip")


def test_region_widgets_show_their_tooltips_on_the_canvas(server, frontend):
    load_template(frontend, "maskattn_regions_shapes")
    tooltip = frontend.page.locator(".node-tooltip")
    for widget, spec in node_info(server, "MaskAttnRegion")["input"]["required"].items():
        if spec[0] in ("MODEL", "CLIP", "MASK") or spec[1].get("multiline"):  # a textarea is a DOM widget, not canvas
            continue
        frontend.hover(*frontend.widget_point("MaskAttnRegion", widget))
        playwright_api.expect(tooltip).to_have_text(spec[1]["tooltip"], timeout=TIMEOUT_MS)
        if widget == "words":
            frontend.screenshot("region_tooltip")


def test_gate_name_lists_the_files_in_models_maskattn(server, frontend):
    page = frontend.page
    load_template(frontend, "maskattn_shapes")
    expected = sorted(["my_gates.safetensors", CORRUPT] + SHIPPED_GATES)
    assert sorted(page.evaluate("() => window.app.graph.nodes.find(n => n.type === 'MaskAttnLoader')"
                                ".widgets.find(w => w.name === 'gate_name').options.values")) == expected
    page.mouse.click(*frontend.widget_point("MaskAttnLoader", "gate_name"))
    entries = page.locator(".litecontextmenu .litemenu-entry")
    entries.first.wait_for()
    assert sorted(entries.all_inner_texts()) == expected
    frontend.screenshot("gate_name_menu")


def test_queueing_the_demo_workflow_shows_the_visualize_mask_preview(server, frontend):
    page = frontend.page
    load_template(frontend, "maskattn_shapes")
    mark = len(frontend.console)
    page.get_by_role("button", name="Run", exact=True).first.click()
    # finished, failed, or refused before it ran (a dialog, e.g. for a node the server does not know)
    page.wait_for_function("() => window.__maskattnEvents.some(e => ['execution_success', 'execution_error']"
                           ".includes(e.type)) || [...document.querySelectorAll('[role=dialog], .p-dialog')].some(d => d.checkVisibility())",
                           timeout=300_000)
    assert frontend.open_dialogs() == []
    assert frontend.events("execution_error") == []
    for node_type in ["MaskAttnVisualize", "SaveImage"]:
        page.wait_for_function(
            "(t) => window.app.graph.nodes.filter(n => n.type === t).every(n => n.imgs && n.imgs.length"
            " && n.imgs.every(i => i.complete && i.naturalWidth > 0))", arg=node_type)
    grid = page.evaluate("() => { const i = window.app.graph.nodes.find(n => n.type === 'MaskAttnVisualize').imgs[0];"
                         " return [i.naturalWidth, i.naturalHeight, i.src] }")
    assert grid[0] > 128 and grid[1] > 128 and "/view?" in grid[2]
    frontend.page.evaluate("() => window.app.canvas.setDirty(true, true)")
    frontend.screenshot("demo_run")
    assert frontend.open_dialogs() == []
    assert frontend.errors_since(mark) == []


def test_a_corrupt_gate_file_shows_the_error_naming_it(server, frontend):
    page = frontend.page
    load_template(frontend, "maskattn_shapes")
    page.mouse.click(*frontend.widget_point("MaskAttnLoader", "gate_name"))
    page.locator(".litecontextmenu .litemenu-entry", has_text=CORRUPT).click()
    assert frontend.widget_value("MaskAttnLoader", "gate_name") == CORRUPT
    page.get_by_role("button", name="Run", exact=True).first.click()
    # frontend 1.32 opens a dialog with the message; 1.49 a notice whose "View details" shows it
    shown = page.get_by_role("dialog").filter(has_text=CORRUPT).or_(page.get_by_role("button", name="View details"))
    shown.first.wait_for(timeout=300_000)
    if not page.get_by_role("dialog").filter(has_text=CORRUPT).count():
        page.get_by_role("button", name="View details").first.click()
    message = page.get_by_text(CORRUPT).filter(has_text="not a readable safetensors file").first
    message.wait_for()
    assert [e["detail"]["node_type"] for e in frontend.events("execution_error")] == ["MaskAttnLoader"]
    frontend.screenshot("corrupt_gate_error")
