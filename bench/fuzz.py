"""Fuzz the live REST API against its own OpenAPI schema (schemathesis), with the admin key and a tenant key.

    python bench/fuzz.py                     # starts a server on a temporary store; 200 examples per
                                             # operation and mode: >= 10,000 requests
    python bench/fuzz.py --examples 20 --url http://127.0.0.1:3000 --admin-key KEY

Every operation gets schema-valid (positive) and schema-invalid (negative) cases; each case is sent
with the admin key (on the generated tenant id) and with the key of tenant `fuzz` (on `fuzz`). Every
answer is checked: no 5xx, status documented, content type and body as the schema says, headers,
schema-invalid requests refused, schema-valid ones accepted (on operations without file or image
payloads: the schema cannot say which bytes are an image), and requests without a key refused.
Prints requests, answers per status, 5xx and check failures (with one example each).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import schemathesis  # noqa: E402
from prompts_store.artifact import TENANT_PATTERN  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

FUZZ_TENANT = "fuzz"
FUZZ_CLASSES = ["red circle", "blue star", "green square"]
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance, st_checks.response_headers_conformance,
          st_checks.negative_data_rejection, st_checks.ignored_auth]
# a schema-valid image or artifact is still random bytes: the schema cannot tell a decodable one apart
QUERY_PARAMETERS = ("limit", "after")  # GET /tenants: the API's only query parameters
STRING_QUERY_PARAMETERS = ("after",)
BINARY_OPERATIONS = {"POST /tenants/{tenant}/classify", "POST /tenants/{tenant}/prompt", "POST /global/prompt"}


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.Counter = field(default_factory=collections.Counter)  # (operation, check title)
    examples: dict = field(default_factory=dict)  # (operation, check title) -> one reproduction
    # schema-invalid query values that are valid once sent (`after=0` from the integer 0): no server can tell
    indistinguishable: int = 0
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def lines(self) -> list[str]:
        out = [f"requests {self.requests} in {self.seconds:.0f} s",
               "statuses " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())),
               f"5xx {self.server_errors}", f"check failures {sum(self.failures.values())}",
               f"schema-invalid cases that are valid once serialized (not failures): {self.indistinguishable}"]
        for (op, title), n in sorted(self.failures.items()):
            out.append(f"  {n:6d}  {op}: {title}\n          {self.examples[(op, title)]}")
        return out


class Fuzzer:
    def __init__(self, url: str, admin_key: str, report: FuzzReport):
        self.url, self.admin, self.report = url.rstrip("/"), admin_key, report
        self.tenant_key = register(self.url, admin_key)

    def send(self, case, key: str, checks: list) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        response = case.call(headers=headers, timeout=60)
        self.report.requests += 1
        self.report.statuses[response.status_code] += 1
        if case.operation.label == "POST /tenants/{tenant}/key" and response.status_code == 200 \
                and case.path_parameters.get("tenant") == FUZZ_TENANT:
            self.tenant_key = response.json()["api_key"]  # the old key stopped working
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                if failure.title == "Schema-violating request accepted" and lost_in_serialization(case):
                    self.report.indistinguishable += 1
                    continue
                self.record(case, failure.title, f"{response.status_code} {response.text[:160]!r} <- "
                                                 f"{case.as_curl_command(headers={'Authorization': 'Bearer ***'})[:400]}")
        except AssertionError as e:
            self.record(case, type(e).__name__, str(e)[:300])

    def record(self, case, title: str, example: str) -> None:
        key = (case.operation.label, title)
        self.report.failures[key] += 1
        self.report.examples.setdefault(key, example)

    def run_operation(self, operation, mode: GenerationMode, examples: int, run_seed: int) -> None:
        checks = list(CHECKS)
        if mode is GenerationMode.POSITIVE and operation.label not in BINARY_OPERATIONS:
            checks.append(st_checks.positive_data_acceptance)

        @seed(run_seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz_one(case) -> None:
            self.send(case, self.admin, checks)  # the admin key, on whatever tenant id was generated
            generated = (case.path_parameters or {}).get("tenant")
            if isinstance(generated, str) and re.fullmatch(TENANT_PATTERN, generated):  # not the invalid part
                case.path_parameters["tenant"] = FUZZ_TENANT
            self.send(case, self.tenant_key, checks)  # its own tenant (DELETE: refused, 403)

        ensure_tenant(self)
        try:
            fuzz_one()
        except Unsatisfiable:  # nothing to make schema-invalid (an operation without parameters or body)
            pass


def lost_in_serialization(case) -> bool:
    """A negative case whose invalid part does not survive the query string or the multipart form: the
    JSON type of a string parameter (`after=0` is also what the valid string "0" sends), an unknown
    parameter whose value is empty or null, or a form field whose value is (HTTP clients send nothing
    for either: `theta=[]` in a form is no theta part at all)."""
    query = case.query or {}
    retyped = any(name in query and not isinstance(query[name], (str, list)) for name in STRING_QUERY_PARAMETERS)
    unsent = any(value in ([], None) for name, value in query.items() if name not in QUERY_PARAMETERS)
    form = case.body if case.media_type == "multipart/form-data" and isinstance(case.body, dict) else {}
    unsent_field = any(value in ([], None) for value in form.values())
    return retyped or unsent or unsent_field


def register(url: str, admin_key: str) -> str:
    """The fuzz tenant's key (registered, or its key rotated when it already exists)."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    r = httpx.post(f"{url}/v1/tenants", json={"tenant": FUZZ_TENANT, "classes": FUZZ_CLASSES}, headers=headers)
    if r.status_code == 409:
        r = httpx.post(f"{url}/v1/tenants/{FUZZ_TENANT}/key", headers=headers)
    r.raise_for_status()
    return r.json()["api_key"]


def ensure_tenant(fuzzer: Fuzzer) -> None:
    """The tenant-key cases need the fuzz tenant (an admin DELETE on a generated id 'fuzz' would remove it)."""
    if httpx.get(f"{fuzzer.url}/v1/tenants/{FUZZ_TENANT}",
                 headers={"Authorization": f"Bearer {fuzzer.admin}"}).status_code == 404:
        fuzzer.tenant_key = register(fuzzer.url, fuzzer.admin)


def fuzz(url: str, admin_key: str, examples: int, run_seed: int = 0) -> FuzzReport:
    """`examples` cases per operation and generation mode, each sent with both keys."""
    report, start = FuzzReport(), time.perf_counter()
    fuzzer = Fuzzer(url, admin_key, report)
    schema = schemathesis.openapi.from_url(f"{fuzzer.url}/v1/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzzer.run_operation(operation, mode, examples, run_seed)
    report.seconds = time.perf_counter() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--examples", type=int, default=200, help="per operation and mode (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="a running service (default: start one on a temporary store)")
    parser.add_argument("--admin-key", help="the running service's admin key (with --url)")
    args = parser.parse_args()
    if args.url:
        report = fuzz(args.url, args.admin_key, args.examples, args.seed)
    else:
        from service_helpers import ADMIN_KEY, Server

        with tempfile.TemporaryDirectory(prefix="pf-fuzz-") as tmp:
            server = Server(Path(tmp) / "store", Path(tmp) / "server.log").start()
            try:
                report = fuzz(server.url, ADMIN_KEY, args.examples, args.seed)
            finally:
                server.stop()
            if "Traceback" in (Path(tmp) / "server.log").read_text():
                print("the server log holds a traceback", file=sys.stderr)
    print("\n".join(report.lines()))
    return 0 if report.server_errors == 0 and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
