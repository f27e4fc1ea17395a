"""The API contract against the running set (called by scripts/check-api).

1. Documents: each service's /openapi.json and the gateway's /api/openapi.json validate as
   OpenAPI 3.1; the gateway's document has exactly the routes of its route table (plus
   its own endpoints); the docs page and its assets come from the gateway itself.
2. Fuzz: schemathesis over every operation of the gateway's document, bounded in time:
   zero 5xx, zero answers outside the document, zero hangs.
3. Hostile input: every answer a 4xx JSON error, the services stay ready, memory bounded.
"""

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import yaml
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

GATEWAY_LOCAL = {
    "/api/openapi.json",
    "/api/docs",
    "/api/docs/docs.js",
    "/api/docs/docs.css",
    "/health",
    "/ready",
    "/metrics",
}
METHODS = ("get", "put", "post", "patch", "delete")
TIMEOUT = 15  # seconds for any single request


def fail(message):
    print(f"check-api: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return response.status, response.headers, response.read()


def fetch_json(url):
    status, _, body = get(url)
    if status != 200:
        fail(f"{url} answered {status}")
    return json.loads(body)


# -- 1. documents ---------------------------------------------------------------------


def route_of(routes, path):
    """The route the gateway picks for a path: exact first, then the longest prefix."""
    for i, r in enumerate(routes):
        if r.get("path") == path:
            return i
    best, best_len = None, -1
    for i, r in enumerate(routes):
        prefix = r.get("prefix")
        if prefix and (path == prefix or path.startswith(prefix + "/")) and len(prefix) > best_len:
            best, best_len = i, len(prefix)
    return best


def check_documents(args):
    documents = {}
    for name, base in args.service:
        doc = fetch_json(f"{base}/openapi.json")
        validate(doc, cls=OpenAPIV31SpecValidator)
        if not doc["openapi"].startswith("3.1"):
            fail(f"{name}: openapi is {doc['openapi']}, not 3.1")
        for own in ("/health", "/ready", "/metrics", "/openapi.json"):
            if "get" not in doc["paths"].get(own, {}):
                fail(f"{name}: GET {own} is served but not documented")
            status, _, _ = get(f"{base}{own}")
            if status != 200:
                fail(f"{name}: GET {own} answered {status}")
        ops = sum(1 for item in doc["paths"].values() for m in METHODS if m in item)
        print(f"  {name}: /openapi.json is valid OpenAPI {doc['openapi']} ({len(doc['paths'])} paths, {ops} operations)")
        documents[name] = doc
    doc = fetch_json(f"{args.gateway}/api/openapi.json")
    validate(doc, cls=OpenAPIV31SpecValidator)
    ops = sum(1 for item in doc["paths"].values() for m in METHODS if m in item)
    print(f"  gateway: /api/openapi.json is valid OpenAPI {doc['openapi']} ({len(doc['paths'])} paths, {ops} operations)")

    # The route table and the document: each side's entries must be in the other.
    routes = yaml.safe_load(open(args.routes))["routes"]
    covered = set()
    problems = []
    for path in doc["paths"]:
        if path in GATEWAY_LOCAL:
            continue
        route = route_of(routes, path)
        if route is None:
            problems.append(f"document path {path} has no route in {args.routes}")
        else:
            covered.add(route)
    for i, r in enumerate(routes):
        if i not in covered:
            problems.append(f"route {r.get('path') or r.get('prefix')} is not in the document")
    for local in GATEWAY_LOCAL:
        if local not in doc["paths"]:
            problems.append(f"the gateway's own {local} is not in the document")
    # Every operation a route exposes is in the document, under the path the gateway
    # exposes it at (the services' documents are the source).
    for i, r in enumerate(routes):
        service = documents[r["upstream"]]
        strip = r.get("strip", "")
        for upstream_path, item in service["paths"].items():
            if "path" in r:
                public = r["path"] if (r["path"][len(strip):] or "/") == upstream_path else None
            else:
                base = r["prefix"][len(strip):] or "/"
                inside = upstream_path == base or upstream_path.startswith(base.rstrip("/") + "/")
                public = strip + upstream_path if inside else None
            if public is None or route_of(routes, public) != i:
                continue
            for m in METHODS:
                if m in item and m not in doc["paths"].get(public, {}):
                    problems.append(f"{m.upper()} {public} ({r['upstream']} {upstream_path}) is missing")
    for path, item in doc["paths"].items():
        for m in METHODS:
            op = item.get(m)
            if not op:
                continue
            route = route_of(routes, path)
            if route is not None and routes[route].get("compatibility"):
                if "compatibility" not in op.get("tags", []):
                    problems.append(f"{m.upper()} {path} is a compatibility route but not marked")
            policy = None
            if route is not None:
                r = routes[route]
                policy = (r.get("read") if m == "get" else r.get("write")) or "user"
            if policy in ("user", "admin") and not op.get("security"):
                problems.append(f"{m.upper()} {path} needs a token but declares no security")
    if problems:
        fail("route table and document differ:\n  " + "\n  ".join(problems))
    print(f"  gateway: document and route table agree ({len(routes)} routes, {len(GATEWAY_LOCAL)} gateway endpoints)")

    # The docs page: served by the gateway, everything it loads from the same origin.
    status, headers, page = get(f"{args.gateway}/api/docs")
    if status != 200 or not headers["content-type"].startswith("text/html"):
        fail(f"/api/docs answered {status} {headers['content-type']}")
    refs = re.findall(rb'(?:src|href)="([^"]+)"', page)
    for ref in refs:
        if not ref.startswith(b"/"):
            fail(f"/api/docs loads {ref.decode()} from elsewhere")
        status, _, _ = get(f"{args.gateway}{ref.decode()}")
        if status != 200:
            fail(f"/api/docs asset {ref.decode()} answered {status}")
    print(f"  gateway: /api/docs and everything it loads ({len(set(refs))} URLs) are served by the gateway (no CDN)")
    return doc


# -- 2. fuzz --------------------------------------------------------------------------


def fuzz(args):
    report = os.path.join(args.work, "schemathesis.ndjson")
    st = os.path.join(os.path.dirname(sys.executable), "st")
    command = [
        st, "run", f"{args.gateway}/api/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_headers_conformance,response_schema_conformance,negative_data_rejection",
        "--header", f"Authorization: Bearer {args.token}",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-time", str(args.fuzz_seconds),
        "--request-timeout", "10",
        "--max-response-time", "10",
        # One worker: with several threads, CPython 3.11 can fail inside hypothesis
        # ("AST constructor recursion depth mismatch"), an interpreter bug, not ours.
        "--workers", "1",
        "--seed", str(args.seed),
        "--suppress-health-check", "all",
        "--report", "ndjson", "--report-ndjson-path", report,
        "--no-color",
    ]
    started = time.monotonic()
    try:
        # In the work directory: schemathesis keeps a cache where it runs.
        result = subprocess.run(command, capture_output=True, text=True, cwd=args.work,
                                timeout=args.fuzz_seconds + 240)
    except subprocess.TimeoutExpired:
        fail(f"schemathesis did not finish within {args.fuzz_seconds + 240} s")
    output = result.stdout + result.stderr
    tail = output[-6000:]
    summary = summarise(report)
    print(f"  schemathesis {summary['phases']}: {summary['operations']} operations, "
          f"{summary['cases']} cases, {summary['failures']} failures, {summary['errors']} errors "
          f"in {time.monotonic() - started:.0f} s (seed {args.seed})")
    if result.returncode != 0 or summary["failures"] or summary["errors"]:
        print(tail, file=sys.stderr)
        fail(f"schemathesis exited {result.returncode}")


def summarise(path):
    """Counts from schemathesis's ndjson event stream."""
    operations, cases, failures, errors = set(), 0, 0, 0
    phases = []
    if not os.path.exists(path):
        return {"operations": 0, "cases": 0, "failures": 0, "errors": 0, "phases": "no report"}
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            (kind, data), = event.items() if len(event) == 1 else (("", {}),)
            if kind == "PhaseFinished":
                name = data.get("phase", {}).get("name", "?")
                if name in ("examples", "coverage", "fuzzing", "stateful"):
                    phases.append(f"{name}={data.get('status', '?')}")
            if kind == "ScenarioFinished":
                recorder = data.get("recorder", {})
                label = recorder.get("label") or ""
                if re.match(r"^[A-Z]+ /", label):
                    operations.add(label)
                cases += len(recorder.get("cases", {}))
                for checks in recorder.get("checks", {}).values():
                    failures += sum(1 for c in checks if c.get("status") == "FAILURE")
            if kind == "NonFatalError":
                errors += 1
    return {
        "operations": len(operations),
        "cases": cases,
        "failures": failures,
        "errors": errors,
        "phases": ", ".join(dict.fromkeys(phases)) or "?",
    }


# -- 3. hostile input -----------------------------------------------------------------


def raw_request(host, port, head, body=b"", read_limit=1 << 20):
    """Sends bytes as they are and reads one response: (status, headers, body)."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        if b"\r\n\r\n" not in data:
            return None, {}, data
        header_blob, rest = data.split(b"\r\n\r\n", 1)
        lines = header_blob.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        length = int(headers.get("content-length", "-1"))
        while length >= 0 and len(rest) < length and len(rest) < read_limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        if length < 0 and headers.get("transfer-encoding") == "chunked":
            while not rest.endswith(b"0\r\n\r\n") and len(rest) < read_limit:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            rest = dechunk(rest)
        return status, headers, rest


def dechunk(data):
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def hostile_cases(doc, token, rng):
    """(name, request head, body, strict) for every operation and every kind of hostility.
    A strict case is invalid: it must get a 4xx JSON error. The others (odd headers or
    query parameters on a valid GET) may also succeed; they must never get a 5xx."""
    auth = f"Authorization: Bearer {token}\r\n".encode()
    ops = []
    for path, item in doc["paths"].items():
        if path in GATEWAY_LOCAL:
            continue
        for m in METHODS:
            if m in item:
                ops.append((m.upper(), re.sub(r"\{[^}]+\}", "1", path)))

    def head(method, target, headers=b"", length=None, ctype=b"application/json", credentials=auth):
        h = f"{method} ".encode() + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + credentials
        if ctype is not None:
            h += b"Content-Type: " + ctype + b"\r\n"
        if length is not None:
            h += f"Content-Length: {length}\r\n".encode()
        return h + headers + b"\r\n"

    nested_array = b"[" * 100_000 + b"]" * 100_000
    nested_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    for method, path in ops:
        target = path.encode()
        bodies = {
            "random bytes": rng.randbytes(4096),
            "deeply nested array": nested_array,
            "deeply nested object": nested_object,
            "invalid UTF-8 in a string": b'{"name":"\xff\xfe\xfd","id":"\xc3\x28"}',
            "truncated JSON": b'{"name": "x", "price": ',
            "JSON array": b"[1,2,3]",
            "wrong types": b'{"name": 1, "price": [], "quantity": "x", "items": {}, "products": 7}',
            "huge numbers": b'{"price": 1e999999, "quantity": 123456789012345678901234567890}',
        }
        for name, body in bodies.items():
            yield f"{method} {path}: {name}", head(method, target, length=len(body)), body, True
        # A body that is no operation's valid input; a GET must carry none at all.
        body = b'{"unexpected_field":1}'
        for ctype in (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                      b"application/json; charset=\xff\xfe"):
            yield f"{method} {path}: content type {ctype[:30]!r}", head(method, target, length=len(body), ctype=ctype), body, True
        yield f"{method} {path}: no content type", head(method, target, length=len(body), ctype=None), body, True
        plain = method == "GET"
        body = b"" if plain else body
        absurd = {
            "a 32 KiB header": b"X-Absurd: " + b"a" * 32_768 + b"\r\n",
            "95 headers": b"".join(f"X-H{i}: {i}\r\n".encode() for i in range(95)),
            "invalid UTF-8 header values": b"X-Bad: \xff\xfe\r\nX-Request-Id: \xc3\x28\r\nTraceparent: \xff\r\n",
            "garbage traceparent and request id": b"Traceparent: 00-zz-zz-zz\r\nX-Request-Id: " + b"x" * 2000 + b"\r\n",
            "identity headers from the client": b"X-User-Id: admin\r\nX-User-Role: admin\r\n",
            "an absurd Idempotency-Key": b"Idempotency-Key: " + b"k" * 5000 + b"\r\n",
        }
        for name, extra in absurd.items():
            strict = not plain or name == "95 headers"
            yield f"{method} {path}: {name}", head(method, target, extra, length=len(body)), body, strict
        for query in (b"?limit=-1&cursor=%FF%FE", b"?limit=99999999999999999999", b"?id=%00%ff&user_id=" + b"u" * 3000,
                      b"?" + b"&".join(b"a%d=1" % i for i in range(500))):
            yield f"{method} {path}: query {query[:30]!r}", head(method, target + query, length=len(body)), body, not plain
    for method, path in ops:
        yield f"{method} {path}: invalid UTF-8 in the path", head(method, path.encode() + b"/%FF%FE", length=0), b"", True
        yield f"{method} {path}: an encoded slash", head(method, path.encode() + b"/..%2F..%2Freservations", length=0), b"", True
        if path.startswith("/api/v1/orders") or path.startswith("/api/v1/users/"):
            bad = b"Authorization: Bearer " + rng.randbytes(64).hex().encode() + b"\r\n"
            yield f"{method} {path}: a forged token", head(method, path.encode(), length=0, credentials=bad), b"", True
    # Bytes no HTTP/1.1 parser accepts: the gateway's parser refuses them (400, no body)
    # before any handler runs, so these are the one kind of answer that is not JSON.
    for method, path in ops[:2]:
        yield f"{method} {path}: a NUL byte in a header", head(method, path.encode(), b"X-Nul: a\x00b\r\n", length=0), b"", "parser"


def big_body_cases(doc, token):
    """Bodies over the limit, declared and streamed; one operation each, they are slow."""
    auth = f"Authorization: Bearer {token}\r\n".encode()
    target = b"/api/v1/products"
    size = 20 << 20
    body = b'{"name":"' + b"x" * size + b'"}'
    yield ("POST /api/v1/products: 20 MiB JSON with Content-Length",
           b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + auth
           + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body), body, True)
    chunked = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in (body[i:i + 65536] for i in range(0, len(body), 65536))) + b"0\r\n\r\n"
    yield ("POST /api/v1/products: 20 MiB JSON, chunked (no length)",
           b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + auth
           + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunked, True)
    yield ("GET /api/v1/products: an absurd Content-Length",
           b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 99999999999999\r\n\r\n", b"", True)


def is_json_error(headers, body):
    if not headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("code"), str) and isinstance(error.get("message"), str)


def hostile(args, doc):
    host, port = args.gateway.removeprefix("http://").split(":")
    port = int(port)
    rng = random.Random(args.seed)
    launcher = psutil.Process(args.pid)
    rss_before = rss(launcher)
    bad, counts, started = [], {}, time.monotonic()
    cases = list(hostile_cases(doc, args.token, rng)) + list(big_body_cases(doc, args.token))
    peak = rss_before
    for i, (name, head, body, strict) in enumerate(cases):
        try:
            status, headers, answer = raw_request(host, port, head, body)
        except (socket.timeout, TimeoutError):
            bad.append(f"{name}: no answer within {TIMEOUT} s")
            continue
        except OSError as e:
            bad.append(f"{name}: connection failed: {e}")
            continue
        counts[status] = counts.get(status, 0) + 1
        client_error = status is not None and 400 <= status < 500
        error = client_error and (is_json_error(headers, answer) or strict == "parser")
        success = strict is False and status is not None and 200 <= status < 300
        if not (error or success):
            bad.append(f"{name}: {status} {headers.get('content-type')} {answer[:200]!r}")
        if i % 50 == 0:
            peak = max(peak, rss(launcher))
    peak = max(peak, rss(launcher))
    for name, base in [("gateway", args.gateway)] + args.service:
        try:
            status, _, body = get(f"{base}/ready")
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            bad.append(f"{name} is not ready afterwards: {e}")
            continue
        if status != 200:
            bad.append(f"{name} is not ready afterwards: {status} {body[:200]!r}")
    print(f"  hostile input: {len(cases)} requests in {time.monotonic() - started:.0f} s, answers by status "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
          + f"; launcher RSS {rss_before >> 20} MiB before, peak {peak >> 20} MiB (limit {args.max_rss_mib} MiB)")
    if peak >> 20 > args.max_rss_mib:
        bad.append(f"memory: peak RSS {peak >> 20} MiB over {args.max_rss_mib} MiB")
    if bad:
        fail(f"{len(bad)} hostile requests were not answered with a 4xx JSON error:\n  " + "\n  ".join(bad[:40]))
    parser = sum(1 for c in cases if c[3] == "parser")
    print(f"  hostile input: every invalid request got a 4xx JSON error ({parser} refused by the HTTP parser "
          "itself, without a body); valid GETs with odd headers or queries succeeded; no 5xx, no hang; "
          "every service still ready")


def rss(process):
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--service", action="append", default=[], type=lambda v: tuple(v.split("=", 1)))
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--routes", required=True)
    parser.add_argument("--fuzz-seconds", type=int, default=60)
    parser.add_argument("--work", required=True)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("API_FUZZ_SEED", "0")) or random.randrange(1 << 30))
    parser.add_argument("--max-rss-mib", type=int, default=int(os.environ.get("API_MAX_RSS_MIB", "512")))
    parser.add_argument("--only", default="documents,fuzz,hostile")
    args = parser.parse_args()
    only = args.only.split(",")
    print("==> API documents")
    doc = check_documents(args)
    if "fuzz" in only:
        print("==> schemathesis through the gateway")
        fuzz(args)
    if "hostile" in only:
        print("==> hostile input through the gateway")
        hostile(args, doc)


if __name__ == "__main__":
    main()
