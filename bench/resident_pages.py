#!/usr/bin/env python3
"""Which code of a binary is resident while it idles, by crate.

    cargo build --profile profiling -p shop-gateway
    python3 bench/resident_pages.py "$CARGO_TARGET_DIR/profiling/gateway"

Starts the binary (static discovery, upstreams that do not answer, AUTH_MODE=demo), waits
3 s, reads which of its file pages are mapped (/proc/PID/pagemap, root needed for nothing
but the present bits) and charges each resident code page to the crates whose symbols lie
in it (`nm`, by bytes; a generic function counts under the crate of its path, so
`core::ptr::drop_in_place<kube::...>` is `core`). The `profiling` build has the release
build's code plus symbols. Prints RSS, the binary's resident pages by permission, the 25
largest crates and a few groups (kube, TLS, token crypto).
"""
import bisect
import collections
import os
import re
import struct
import subprocess
import sys
import time

GROUPS = {
    "kube + k8s-openapi": ("kube", "k8s_openapi"),
    "TLS (rustls, aws-lc)": ("rustls", "aws_lc", "hyper_rustls", "tokio_rustls", "webpki", "rustls_pki_types"),
    "token crypto (jsonwebtoken, RSA bignums, ed25519)": ("jsonwebtoken", "num_bigint_dig", "rsa", "curve25519_dalek",
                                                          "ed25519"),
}


def crate(name: str) -> str:
    name = name.lstrip("<&*(")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", name)
    if m:
        return m.group(1)
    if name.startswith(("aws_lc", "GFp", "ring_")):
        return "aws_lc"
    return "(other)"


def main() -> int:
    binary = os.path.realpath(sys.argv[1])
    env = os.environ | {"HOST": "127.0.0.1", "PORT": "0", "AUTH_MODE": "demo", "RUST_LOG": "warn",
                        "PRODUCT_URL": "http://127.0.0.1:1", "ORDER_URL": "http://127.0.0.1:1",
                        "USER_URL": "http://127.0.0.1:1", "JWT_JWKS_URL": "http://127.0.0.1:1/jwks"}
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    maps = []
    for line in open(f"/proc/{proc.pid}/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == binary:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[1], int(parts[2], 16)))
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in open(f"/proc/{proc.pid}/status"))
              if k in ("VmRSS", "RssAnon", "RssFile")}
    present = []
    with open(f"/proc/{proc.pid}/pagemap", "rb") as pagemap:
        for lo, hi, perm, _ in maps:
            pagemap.seek(lo // 4096 * 8)
            data = pagemap.read((hi - lo) // 4096 * 8)
            present += [(lo + i * 4096, perm) for i in range((hi - lo) // 4096)
                        if struct.unpack_from("<Q", data, i * 8)[0] >> 63]
    proc.terminate()
    proc.wait()
    base = next(lo - off for lo, _, _, off in maps if off == 0)
    symbols = []
    for line in subprocess.run(["nm", "-C", "-S", "--defined-only", binary], capture_output=True,
                               text=True).stdout.splitlines():
        p = line.split(" ", 3)
        if len(p) == 4 and p[2] in "tT":
            symbols.append((int(p[0], 16), int(p[1], 16), p[3]))
    symbols.sort()
    starts = [s[0] for s in symbols]
    kib = collections.Counter()
    pages_by_perm = collections.Counter(perm for _, perm in present)
    for addr, perm in present:
        if "x" not in perm:
            kib[f"(not code: {perm})"] += 4
            continue
        va = addr - base
        i = bisect.bisect_right(starts, va + 4096) - 1
        weights = collections.Counter()
        while i >= 0 and symbols[i][0] > va - 65536:
            start, size, name = symbols[i]
            overlap = min(start + size, va + 4096) - max(start, va)
            if overlap > 0:
                weights[crate(name)] += overlap
            i -= 1
        total = sum(weights.values())
        if not total:
            kib["(code without symbols)"] += 4
        for c, w in weights.items():
            kib[c] += 4 * w / total
    print(f"{os.path.basename(binary)} idle: {status}")
    print(f"resident pages of the binary: {len(present)} ({len(present) * 4 / 1024:.1f} MiB), by permission "
          f"{dict(pages_by_perm)}")
    for c, n in kib.most_common(25):
        print(f"  {c:45s} {n:7.0f} KiB")
    for group, prefixes in GROUPS.items():
        print(f"{group}: {sum(n for c, n in kib.items() if c.startswith(prefixes)):.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
