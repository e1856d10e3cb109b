"""Time to first reply of the README's quick start, as a newcomer on a fresh machine meets it.

Clones this repository's HEAD into a scratch folder, runs ``bash scripts/quickstart.sh`` there
with nothing cached (a new ``.venv``, no pip cache, a fresh ``DYNAMO_CACHE`` for the tiny
model), and retries the README's chat ``curl`` until it answers. Prints when each phase
ended, read off the script's own numbered ``[setup N/4, Ts]`` lines and the ``ready:`` line,
so the table says what dominates.

    python benchmarks/quickstart_time.py [--engine torch|vllm] [--port 18500] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 180.0


def chat(port: int) -> str | None:
    body = {"model": "dynamo-tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16}  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(json.loads(answer.read())["choices"][0]["message"]["content"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="dynamo-fresh-"))
    clone = scratch / "repo"
    log_path = scratch / "quickstart.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "NATS_", "ETCD_"))
    }
    env.update(PIP_NO_CACHE_DIR="1", DYNAMO_CACHE=str(scratch / "cache"), PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    began = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    cloned = time.monotonic() - began
    command = [
        "bash",
        "scripts/quickstart.sh",
        "--engine",
        args.engine,
        f"--Frontend.port={args.port}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    reply, replied = None, None
    try:
        while time.monotonic() - began < args.timeout and proc.poll() is None:
            reply = chat(args.port)
            if reply is not None:
                replied = time.monotonic() - began
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text(errors="replace")
    phases = [(f"setup {m[1]} began", float(m[2]) + cloned, m[3])
              for m in re.finditer(r"\[setup (\d/\d), (\d+)s\] (.*)", out)]  # fmt: skip
    done = re.search(r"\[setup\] done in (\d+) s", out)
    print(f"quick start ({args.engine} engine) from a fresh clone, {os.cpu_count()} cores")
    print(f"{'phase':34} {'at (s)':>8}  what")
    print(f"{'git clone':34} {cloned:8.1f}")
    for name, at, what in phases:
        print(f"{name:34} {at:8.1f}  {what[:70]}")
    if done:
        print(f"{'setup done':34} {float(done[1]) + cloned:8.1f}")
    if replied is None:
        print(f"no reply within {args.timeout:.0f} s (exit {proc.returncode}); log: {log_path}")
        print(out[-3000:])
        return 1
    print(f"{'first chat reply':34} {replied:8.1f}  {reply!r}")
    verdict = "ok" if replied <= TARGET_S else "MISS"
    print(f"target: first reply within {TARGET_S:.0f} s of git clone: {replied:.1f} s {verdict}")
    if args.keep:
        print(f"kept {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
