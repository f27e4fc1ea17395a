"""The README's configuration table against what the binaries read.

Every binary lists its variables (`<binary> describe`); each must have a row in README.md's
table naming that binary (or "all"), and every name in the table must be read by some
binary. Run by ./scripts/test after the workspace's binaries are built.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
BINARIES = ["gateway", "product", "order", "user", "shop"]
# The launcher is written `shop` in the table; "all" means every binary.
HEADER = "| variable | default | binaries | meaning |"


def read_by() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for binary in BINARIES:
        described = json.loads(subprocess.run([str(BIN / binary), "describe"], check=True,
                                              capture_output=True, text=True).stdout)
        for var in described["vars"]:
            out.setdefault(var["name"], set()).add(binary)
    return out


def documented() -> dict[str, set[str]]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index(HEADER):].split("\n\n")[0].splitlines()[2:]
    out: dict[str, set[str]] = {}
    for row in table:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names, binaries = re.findall(r"`([A-Z<][A-Z0-9_<>]*)`", cells[0]), cells[2]
        who = set(BINARIES) if binaries == "all" else {
            b for b in BINARIES if re.search(rf"(^|[ ,`]){b}($|[ ,`])", binaries)}
        for name in names:
            out.setdefault(name, set()).update(who)
    return out


def main() -> int:
    reads, docs = read_by(), documented()
    problems = []
    for name, binaries in sorted(reads.items()):
        if name not in docs:
            problems.append(f"{name} (read by {', '.join(sorted(binaries))}) has no row in README.md's table")
        elif missing := binaries - docs[name]:
            problems.append(f"{name}: README.md's row does not name {', '.join(sorted(missing))}")
    templates = [re.compile("^" + re.escape(n).replace(re.escape("<UPSTREAM>"), "[A-Z0-9]+") + "$")
                 for n in reads if "<" in n]
    for name in sorted(docs):
        if name not in reads and not any(t.match(name) for t in templates):
            problems.append(f"{name}: in README.md's table, but no binary reads it")
    for p in problems:
        print(f"  FAIL {p}")
    print(f"  {'ok  ' if not problems else 'FAIL'} {len(reads)} variables read by the binaries, "
          f"{len(docs)} names in README.md's table")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
