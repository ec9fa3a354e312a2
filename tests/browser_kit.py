"""ComfyUI's real frontend in headless Chromium (Debian's `chromium`, driven by PyPI's playwright).

Everything waits on the page's own state (window.app, the graph, the websocket, the DOM, animation
frames), never on a fixed sleep. The browser reaches only the test server: ComfyUI's frontend also
asks api.comfy.org about nodes and releases, and those requests are aborted here (and their console
lines are not counted as the pack's errors).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
TIMEOUT_MS = 120_000  # two slow shared cores: the frontend's bundle alone takes seconds to parse

# Read by the frontend at start: no first-run template dialog, no minimap over the canvas, quick tooltips,
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Node.TooltipDelay": 100,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # text and widgets drawn at any zoom, for the screenshots
}


def chromium_executable() -> str | None:
    """$MASKATTN_CHROMIUM, else Debian's `chromium` on PATH."""
    explicit = os.environ.get("MASKATTN_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("chromium")


def write_settings(server_base: Path) -> None:
    """The default user's settings, as the frontend would have saved them."""
    path = server_base / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "workflows").mkdir(exist_ok=True)
    path.write_text(json.dumps(SETTINGS, indent=4))


NEXT_FRAME = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"

READY = """() => !!(window.app && window.app.vueAppReady && window.app.graph && window.app.canvas
  && window.app.api.socket && window.app.api.socket.readyState === WebSocket.OPEN
  && window.LiteGraph && window.LiteGraph.registered_node_types['KSampler'])"""

# Every queue-related websocket event the frontend receives, kept for the test to wait on.
RECORD_EVENTS = """() => {
  window.__maskattnEvents = [];
  for (const type of ['execution_start', 'executed', 'execution_error', 'execution_success',
                      'execution_interrupted']) {
    window.app.api.addEventListener(type, (e) => window.__maskattnEvents.push({type, detail: e.detail}));
  }
}"""

# Fit every node into the part of the window that the side bar, tabs and run button leave free.
FIT_VIEW = """async () => {
  const c = window.app.canvas, nodes = window.app.graph.nodes;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const rect = c.canvas.getBoundingClientRect(), left = 70, top = 160;
  const scale = Math.min((rect.width - left - 20) / (x1 - x0), (rect.height - top - 20) / (y1 - y0), 1);
  c.ds.scale = scale;
  c.ds.offset = [left / scale - x0, top / scale - y0];
  c.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
}"""

# The nodes' bounding box in page pixels (titles included), clipped to the window.
GRAPH_BOX = """() => {
  const c = window.app.canvas, nodes = window.app.graph.nodes, ds = c.ds, rect = c.canvas.getBoundingClientRect();
  const x = (v) => rect.left + (v + ds.offset[0]) * ds.scale, y = (v) => rect.top + (v + ds.offset[1]) * ds.scale;
  return [Math.max(0, x(Math.min(...nodes.map(n => n.pos[0]))) - 10),
          Math.max(0, y(Math.min(...nodes.map(n => n.pos[1] - 30))) - 10),
          Math.min(rect.right, x(Math.max(...nodes.map(n => n.pos[0] + n.size[0]))) + 10),
          Math.min(rect.bottom, y(Math.max(...nodes.map(n => n.pos[1] + n.size[1]))) + 10)];
}"""

# Where a node's widget is drawn, in page pixels (graph position + offset, times the scale).
WIDGET_POINT = """([type, name]) => {
  const c = window.app.canvas, n = window.app.graph.nodes.find(n => n.type === type);
  const w = n.widgets.find(w => w.name === name);
  const rect = c.canvas.getBoundingClientRect(), ds = c.ds;
  const height = w.computeSize ? w.computeSize(n.size[0])[1] : 20;
  const gx = n.pos[0] + n.size[0] * 0.6, gy = n.pos[1] + w.y + Math.min(height, 20) / 2;
  return [rect.left + (gx + ds.offset[0]) * ds.scale, rect.top + (gy + ds.offset[1]) * ds.scale];
}"""


# Anything open over the canvas: a dialog, a LiteGraph menu, the node search box, a side panel.
OVERLAYS = """() => [...document.querySelectorAll('[role=dialog], .p-dialog, .litecontextmenu, .side-bar-panel')]
  .filter(e => e.checkVisibility() || e.classList.contains('litecontextmenu')).map(e => e.className)"""
CLOSE_OVERLAYS = """() => {
  document.querySelectorAll('.litecontextmenu').forEach(m => m.close ? m.close() : m.remove());
  document.querySelectorAll('[role=dialog], .p-dialog').forEach(d => d.querySelector('button[aria-label=Close], .p-dialog-close-button')?.click());
  const sidebar = window.app.extensionManager.sidebarTab;
  if (sidebar.activeSidebarTabId) sidebar.toggleSidebarTab(sidebar.activeSidebarTabId);
}"""


class Frontend:
    """One browser tab on ComfyUI's frontend, with the console errors it logged."""

    def __init__(self, browser, server_url: str):
        self.url = server_url
        self.context = browser.new_context(viewport={"width": 1920, "height": 1200})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.route(lambda url: not url.startswith(server_url), lambda route: route.abort())
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.console.append(f"page error: {error}"))

    def _on_console(self, message):
        where = (message.location or {}).get("url", "")
        if message.type == "error" and not (where.startswith("http") and not where.startswith(self.url)):
            self.console.append(f"{message.text} ({where})")

    def open(self) -> "Frontend":
        self.page.goto(self.url)
        self.page.wait_for_function(READY, timeout=TIMEOUT_MS)
        self.page.evaluate(RECORD_EVENTS)
        self.page.evaluate(NEXT_FRAME)
        return self

    def reset(self):
        """Back to the bare canvas: dialogs, menus, the search box and side panels closed."""
        page = self.page
        for _ in range(5):
            if not page.evaluate(OVERLAYS):
                break
            page.keyboard.press("Escape")
            page.evaluate(CLOSE_OVERLAYS)
            page.evaluate(NEXT_FRAME)
        assert not page.evaluate(OVERLAYS), page.evaluate(OVERLAYS)
        page.mouse.move(5, 600)

    def close(self):
        self.context.close()

    def errors_since(self, mark: int) -> list[str]:
        return self.console[mark:]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.evaluate(NEXT_FRAME)
        self.page.screenshot(path=str(path))
        return path

    def thumbnail(self, name: str) -> Path:
        """The graph on the canvas as a square JPEG, the form the template browser shows beside a template."""
        from PIL import Image

        shot = ARTIFACTS / f"template_{name}.png"
        box = self.page.evaluate(GRAPH_BOX)
        with Image.open(shot) as image:
            graph = image.convert("RGB").crop(tuple(round(v) for v in box))
            background = image.getpixel((image.width // 2, image.height - 40))
        side = max(graph.size)
        square = Image.new("RGB", (side, side), background)
        square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
        path = ARTIFACTS / f"{name}.jpg"
        square.resize((640, 640), Image.LANCZOS).save(path, quality=88)
        return path

    def command(self, command_id: str):
        self.page.evaluate("(id) => window.app.extensionManager.command.execute(id)", command_id)

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => window.app.graph.nodes.map(n => n.type)")

    def fit_view(self):
        self.page.evaluate(FIT_VIEW)

    def widget_point(self, node_type: str, widget: str) -> tuple[float, float]:
        x, y = self.page.evaluate(WIDGET_POINT, [node_type, widget])
        return x, y

    def widget_value(self, node_type: str, widget: str):
        return self.page.evaluate(
            "([t, w]) => window.app.graph.nodes.find(n => n.type === t).widgets.find(x => x.name === w).value",
            [node_type, widget])

    def hover(self, x: float, y: float):
        # two moves: the frontend's tooltip timer starts on a mousemove over the canvas
        self.page.mouse.move(x - 3, y)
        self.page.mouse.move(x, y)

    def open_dialogs(self) -> list[str]:
        return self.page.evaluate(
            "() => [...document.querySelectorAll('[role=dialog], .p-dialog')].filter(d => d.checkVisibility())"
            ".map(d => d.innerText)")

    def events(self, kind: str | None = None) -> list[dict]:
        events = self.page.evaluate("() => window.__maskattnEvents")
        return [e for e in events if kind is None or e["type"] == kind]
