"""README.md's shell blocks, kept honest: each is run here, or says what covers it.

Every ```sh block in README.md is preceded by one marker line:
- `<!-- check: run demo -->`: run here, in README order, against one fresh launcher
  (target/debug/shop) with AUTH_MODE=demo on the README's ports; `curl` fails on an HTTP
  error (`--fail-with-body`), and `open URL` fetches the page;
- `<!-- check: covered by scripts/NAME -->`: that script (part of ./scripts/test) runs it;
- `<!-- check: not run here: REASON -->`.
A block without a marker fails the check. Run by ./scripts/test.
"""
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "shop"
BLOCK = re.compile(r"(?:^(<!-- check: (.*?) -->)\n)?^```sh\n(.*?)^```", re.M | re.S)
PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body -sS "$@"; echo; }
open() { command curl --fail -sS -o /dev/null "$1"; echo "fetched $1"; }
"""


def main() -> int:
    text = (ROOT / "README.md").read_text()
    problems, runs, covered = [], [], []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start(3))
        marker, body = m.group(2), m.group(3)
        if marker is None:
            problems.append(f"README.md:{line}: a sh block without a <!-- check: ... --> marker")
        elif marker == "run demo":
            runs.append((line, body))
        elif (script := re.fullmatch(r"covered by (scripts/[\w./-]+)", marker)):
            if not (ROOT / script.group(1)).exists():
                problems.append(f"README.md:{line}: {script.group(1)} does not exist")
            covered.append(line)
        elif not marker.startswith("not run here: "):
            problems.append(f"README.md:{line}: unknown marker {marker!r}")
    if runs:
        problems += run_blocks(runs)
    for p in problems:
        print(f"  FAIL {p}")
    print(f"  {'ok  ' if not problems else 'FAIL'} {len(runs)} blocks run against the launcher, "
          f"{len(covered)} covered by other checks")
    return 1 if problems else 0


def run_blocks(runs: list[tuple[int, str]]) -> list[str]:
    problems = []
    with tempfile.TemporaryDirectory() as work:
        env = os.environ | {"AUTH_MODE": "demo", "DATA_DIR": work, "RUST_LOG": "warn"}
        log = open(Path(work) / "shop.log", "wb")
        shop = subprocess.Popen([str(BIN)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen("http://localhost:8080/ready", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or shop.poll() is not None:
                        return [f"the launcher did not become ready: {(Path(work) / 'shop.log').read_text()[-2000:]}"]
                    time.sleep(0.1)
            for line, body in runs:
                res = subprocess.run(["bash", "-c", PRELUDE + body], capture_output=True, text=True, timeout=60)
                first = body.strip().splitlines()[0]
                if res.returncode != 0:
                    problems.append(f"README.md:{line}: `{first}` ... exited {res.returncode}: "
                                    f"{(res.stdout + res.stderr)[-600:]}")
                else:
                    print(f"  ok   README.md:{line}: {first[:70]}")
        finally:
            shop.terminate()
            shop.wait(timeout=30)
    return problems


if __name__ == "__main__":
    sys.exit(main())
