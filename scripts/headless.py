"""Run a real ComfyUI server on 127.0.0.1 with this pack installed, and queue workflows on it.

Used by the demo (scripts/demo.py) and the server tests. The server gets its own base
directory (custom_nodes/, models/, output/), so nothing of a user's ComfyUI is touched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
TINY_NODES = PACK_ROOT / "tests" / "tiny_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui: Path, base: Path, extra_nodes: list[Path] = (), python: str = sys.executable):
        self.comfyui, self.base, self.python = Path(comfyui), Path(base), python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        custom_nodes = self.base / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for source, name in [(PACK_ROOT, "ComfyUI-MaskAttn")] + [(p, p.name) for p in extra_nodes]:
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(source, target_is_directory=True)
        (self.base / "models" / "maskattn").mkdir(parents=True, exist_ok=True)
        self.output = self.base / "output"
        self.process = None

    def __enter__(self):
        log = open(self.base / "server.log", "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-auto-launch", "--dont-print-server"],
            cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within 180 s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"POST {path} failed ({error.code}): {error.read().decode(errors='replace')}") from error

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format workflow and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"workflow {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")


def to_api_format(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (as saved by ComfyUI's frontend) as the API format /prompt takes.

    Widget values are matched to each node's widget inputs in /object_info order; a seed with
    control_after_generate carries one extra UI-only value after it.
    """
    links = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        inputs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                inputs[slot["name"]] = list(links[slot["link"]])
        values = list(node.get("widgets_values", []))
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            if name in inputs or not values:
                continue
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                inputs[name] = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
