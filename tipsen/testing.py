"""Helpers for the tests and the benchmarks, in the manner of diffusers' testing utilities.

Each on-disk format they fake is written here once: a bank of random LoRA adapters, a params file derived from the
repository's, a curated keyword folder. So is the harness that runs `tipsen serve` on 127.0.0.1. Heavy imports
(torch, diffusers, httpx) happen inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from tipsen.paths import ROOT

# The small service that tests/test_service.py and tests/test_web.py both serve: the demo profile at 64 px with few
# default steps, sizes 32-64 and the template assistant, over a bank of four random adapters plus a corrupt one.
SERVICE_SLUGS = ["gimjang", "yakgwa", "songpyeon", "kimbap"]
SERVICE_CORRUPT = "hanbok"
SERVICE_SIZE = 64
SERVICE_PARAMS = {
    "generate": {"steps": 4, "width": SERVICE_SIZE, "height": SERVICE_SIZE, "min_size": 32, "max_size": SERVICE_SIZE},
    "assistant": {"backend": "template"},
    "service": {"max_batch_size": 8, "max_latency_ms": 300000, "timeout_s": 300, "max_queue": 20,
                "max_concurrency": 48, "max_client_requests": 40},
}


# ---------------------------------------------------------------- files


def random_bank(out: Path, slugs: Sequence[str], *, rank: int = 4, alpha: float | None = None,
                target_modules: Sequence[str] | None = None, seed: int = 100, scale: float = 1.0,
                corrupt: str | None = None, registry=None, unet=None, lora_bias: bool = False) -> Path:
    """Random LoRA adapters on tiny:sdxl's UNet, saved as the trainer saves them and indexed by the real bank builder.

    Writes `out/loras/<slug>/pytorch_lora_weights.safetensors` for each slug and returns the index `out/bank.json`.
    Adapter i is drawn after `torch.manual_seed(seed + i)` with a random lora_B, so that it visibly changes the
    image, then lora_B is multiplied by `scale`. `alpha` defaults to `rank` and `target_modules` to the trainer's.
    `corrupt` is one adapter more: indexed, then one byte flipped, so its file no longer matches the index.
    `unet`: another UNet to shape the adapters for (the full-size SDXL one); it is left without adapters.
    `lora_bias`: adapters with a bias on lora_B (peft's `lora_bias`), which only peft's path draws.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.config import TrainParams
    from tipsen.models import resolve_ref
    from tipsen.paths import bank_beside
    from tipsen.registry import Registry

    loras = Path(out) / "loras"
    targets = list(target_modules or TrainParams.model_fields["target_modules"].default)
    names = [*slugs, *([corrupt] if corrupt else [])]
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(resolve_ref("tiny:sdxl"), subfolder="unet", use_safetensors=True)
    for i, slug in enumerate(names):
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets,
                            init_lora_weights=False, lora_bias=lora_bias)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one adapter after another
            unet.add_adapter(config, adapter_name=slug)
        if scale != 1.0:
            with torch.no_grad():
                for name, param in unet.named_parameters():
                    if f"lora_B.{slug}." in name:
                        param.mul_(scale)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=slug))
        StableDiffusionXLPipeline.save_lora_weights(loras / slug, unet_lora_layers=layers, safe_serialization=True)
        unet.delete_adapters(slug)  # only one resident at a time: a bank of 30 stays as cheap as a bank of 3
    bank = bank_beside(loras)
    build_bank(loras, bank, keywords=names, registry=registry or Registry.load(), base_model="tiny:sdxl")
    if corrupt:  # the file stays in place; its bytes no longer match the index
        weights = loras / corrupt / WEIGHTS_NAME
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    return bank


def write_params(path: Path, sections: dict[str, dict[str, Any]] | None = None, *,
                 keywords: Sequence[str] | None = None, profile: str = "demo") -> Path:
    """The repository's params.yaml with each of `sections` merged key by key into profiles.<profile>, `profile`
    made the active one and, when given, `keywords` as the keyword list. Nothing is validated: tests write bad
    values on purpose."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    chosen = raw["profiles"][profile]
    for name, values in (sections or {}).items():
        chosen[name] = {**(chosen.get(name) or {}), **values}
    raw["profile"] = profile
    if keywords is not None:
        raw["keywords"] = list(keywords)
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_curated(root: Path, slug: str, *, n: int = 4, heldout: int = 1, splits: Sequence[str] | None = None,
                  res: int = 64, seed: int = 0, registry=None) -> Path:
    """One keyword's curated folder, `root/<slug>/`, in the format `tipsen curate` writes and the trainer reads.

    The images are `NNN.png`, the keyword's demo motif at `res` x `res`; metadata.jsonl has one row per image.
    There are `n` train images, then `heldout` held-out ones, unless `splits` names each image's split. A second
    call replaces the folder's metadata (a different `seed` gives new images). Returns `root`.
    """
    import numpy as np

    from tipsen.demodata import motif
    from tipsen.registry import Registry
    from tipsen.train_data import METADATA

    registry = registry or Registry.load()
    kw, ki = registry[slug], list(registry.keywords).index(slug)
    splits = list(splits) if splits is not None else ["train"] * n + ["heldout"] * heldout
    folder = Path(root) / slug
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, ki])
    rows = []
    for j, split in enumerate(splits):
        name = f"{j:03d}.png"
        motif(ki, rng, res, res).save(folder / name)
        rows.append({"file_name": name, "slug": slug, "text": f"{kw.ko} 사진 {j}", "prompt": kw.prompt,
                     "original_size": [200 + j, 300], "crop_top_left": [0, 50], "scores": {"clip": 0.3},
                     "source_id": f"senior-news/article/{j}", "split": split})
    (folder / METADATA).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(root)


# ---------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tipsen serve` on 127.0.0.1 in a subprocess of its own process group; its output goes to `tmp/server.log`.

    The server starts at once; `wait_ready()` polls /readyz and records every answer in `readiness`."""

    def __init__(self, tmp: Path, *, params: Path, bank: Path, key: str | None = None, extra_env: dict | None = None,
                 port: int | None = None, host: str = "127.0.0.1"):
        self.port, self.log = port or free_port(), Path(tmp) / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "TIPSEN_API_KEY"}
        env.update({"TIPSEN_API_KEY": key} if key else {})
        env.update(extra_env or {})
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tipsen.cli", "serve", "--params", str(params), "--profile", "demo",
             "--bank", str(bank), "--port", str(self.port), "--host", host],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        self.readiness: list[int | None] = []  # /readyz answers from the moment the process started

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                status = httpx.get(f"{self.url}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                status = None  # not listening yet
            self.readiness.append(status)
            if status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        self._out.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server's own process group: bentoml and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._out.close()


def slow_post(port: int, *, body_len: int, chunk: bytes, every_s: float, bound_s: float, source: str = "127.0.0.1",
              path: str = "/refine") -> tuple[int | None, str]:
    """A client that sends the headers, then `chunk` every `every_s` seconds, for at most `bound_s` seconds (the
    attack is bounded: a test must end). Returns the status the server answered and its body (None: no answer)."""
    sock = socket.socket()
    sock.settimeout(bound_s + 30)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {body_len}\r\n\r\n".encode())
        sock.setblocking(False)
        deadline, sent, answer = time.monotonic() + bound_s, 0, b""
        while time.monotonic() < deadline and sent < body_len:
            try:
                answer += sock.recv(65536)
                if b"\r\n\r\n" in answer:
                    break  # the server answered before the body was complete
            except BlockingIOError:
                pass
            try:
                sock.send(chunk[:body_len - sent])
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
            time.sleep(every_s)
        sock.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer and (got := sock.recv(65536)):
                answer += got
            head = answer.partition(b"\r\n\r\n")[0]
            length = int(dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:]
                              if b": " in line).get(b"content-length", b"0"))
            while len(answer) - len(head) - 4 < length and (got := sock.recv(65536)):
                answer += got
        except (ConnectionResetError, socket.timeout):
            pass
        if not answer.startswith(b"HTTP/1.1 "):
            return None, ""
        return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
    finally:
        sock.close()


def a1111_png_info(text: str) -> tuple[str, str, dict[str, str]]:
    """A `parameters` chunk read the way AUTOMATIC1111's "PNG info" reads it (its parse_generation_parameters):
    prompt lines, then the lines after `Negative prompt:`, then the last line's `key: value` pairs (a value may be
    quoted). Returns (prompt, negative prompt, pairs)."""
    import re

    pair = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(pair.findall(last)) < 3:  # no parameters line: everything is prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), {k: v for k, v in pair.findall(last)}


# ---------------------------------------------------------------- a Hub on 127.0.0.1


class Hub:
    """Model repositories in the Hub's HTTP layout: model info, the recursive tree, and resolve/ for each file.

    Every request is recorded, so a test can show that nothing was fetched."""

    def __init__(self, repos: dict[str, dict[str, bytes]], *, gated: tuple[str, ...] = ()):
        self.repos = {rid.lower(): files for rid, files in repos.items()}  # the Hub's ids are case-insensitive
        self.gated = {rid.lower() for rid in gated}  # answered as a gated repository to a caller without access
        self.sha = {rid: hashlib.sha1(json.dumps(sorted(f)).encode()).hexdigest() for rid, f in self.repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, *, body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                status, headers, data = hub.route(self.path.split("?")[0])
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, path: str) -> tuple[int, dict, bytes]:
        for rid, files in self.repos.items():
            sha = self.sha[rid]
            if rid in self.gated and rid in path.lower():
                return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted",
                             "Content-Type": "application/json"}, b'{"error": "gated"}'
            if path.lower().startswith(f"/api/models/{rid}/revision/"):
                info = {"id": rid, "modelId": rid, "sha": sha, "private": False, "gated": False, "tags": [],
                        "siblings": [{"rfilename": name} for name in files]}
                return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
            if path.lower().startswith(f"/api/models/{rid}/tree/"):
                tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
                return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
            prefix = f"/{rid}/resolve/"
            if path.lower().startswith(prefix):
                name = path[len(prefix):].partition("/")[2]
                if name in files:
                    data = files[name]
                    return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, data
        return 404, {"Content-Type": "application/json"}, b'{"error": "Repository not found"}'

    def close(self):
        self.server.shutdown()
        self.server.server_close()
