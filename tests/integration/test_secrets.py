"""Secrets stay where they belong: the real stack with known secrets, searched everywhere for them.

A stack of its own (one Triton replica, the EfficientNet model, tracing on with the file exporter)
runs with an S3 secret key, a static API key and an admin key that carry a token fresh each run.
Traffic goes through every front door, with failures: good Flotilla and KServe (gRPC and HTTP) calls,
a near-miss of a real key (one character changed), a garbled key, a key sent without ``Bearer``, a
scoped key calling a model it may not, an image the store does not have, an upload signed with a
near-miss S3 secret key, admin calls with a near-miss admin key, and the CLI (``flotilla keys
create``/``list``, ``flotilla models status``/``list``, ``flotilla infer`` with good and bad keys, a
refused ``keys create``). Then every secret, the secret part of the key ``keys create`` printed and
every wrong key that was presented (an echoed near-miss gives the real key away but for one
character) is searched for, raw and in its percent, JSON and base64 forms, in:

- every file under the run directory (logs, traces, the replica's and S3's data, the metrics targets)
  but the two that hold secrets by design, ``flotilla.resolved.yaml`` and ``stack.json`` (mode 0600);
- every process's ``/metrics`` (Triton's own included);
- what the clients got back: status details, initial and trailing metadata, HTTP headers and bodies;
- the CLI's output (the created key only outside its own ``keys create``);
- the log records of this process (the stack's own supervisor), at DEBUG;
- the command lines of every process the stack started (anyone on the host may read them);
- what ``flotilla up`` prints (``LocalStack.describe``): the API key at most once, no other secret.

A hit fails the test naming where it was, with an excerpt in which the secret is masked.
``test_the_search_finds_a_planted_secret_in_each_form`` keeps the search itself honest. Two leaks
this test found are kept as tests of their own: a refused setting repeated in the configuration
error, and the stack state's repr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import stat
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from pydantic import SecretStr

from flotilla.api.kserve import grpc_service_pb2, grpc_service_pb2_grpc
from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, inference_pb2
from flotilla.cli import main
from flotilla.clients.client import FlotillaClient
from flotilla.clients.models import ModelsClient
from flotilla.common.wire import CLASSIFY_METHOD, MODEL_HEADER
from flotilla.config import load_settings
from flotilla.errors import FlotillaError
from flotilla.stack.local import LocalStack
from flotilla.stack.state import StackState
from tests.integration.conftest import MODEL, SAMPLES, sample, stack_settings
from tests.waiting import until

TOKEN = secrets.token_hex(6)
"""Fresh each run: a hit can only be this run's."""
S3_SECRET = f"s3/Secret+{TOKEN}"
"""With the '/' and '+' real S3 secret keys have, so that a percent- or JSON-escaped copy differs."""
API_KEY = f"api-key.{TOKEN}"
ADMIN_KEY = f"admin+key.{TOKEN}"
OTHER_MODEL = "open-nsfw"
"""A model the scoped key below may not call (scope is checked before whether it is served)."""
BY_DESIGN = ("flotilla.resolved.yaml", "stack.json")
"""The run directory's files that hold the secrets on purpose (the services' and the CLI's configuration)."""
EXCERPT_CHARS = 60
MASK = "<SECRET>"
Call = grpc.aio.UnaryUnaryCall[Any, Any]
"""A unary call on its way (awaited for its answer; its metadata read after)."""


def near_miss(key: str) -> str:
    """``key`` with its last character changed."""
    return key[:-1] + ("0" if key[-1] != "0" else "1")


# -- the search ----------------------------------------------------------------


def _base64_cores(value: bytes) -> set[bytes]:
    """The base64 characters that depend on ``value`` alone, wherever it starts in the encoded data
    (three alignments), in the standard and the URL-safe alphabet."""
    found = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + value)
        first = -(-offset * 8 // 6)  # the first character no byte before ``value`` touches
        last = (offset + len(value)) * 8 // 6  # the characters after this one are touched by what follows
        core = encoded[first:last]
        found |= {core, core.translate(bytes.maketrans(b"+/", b"-_"))}
    return found


def forms(value: str) -> set[bytes]:
    """How ``value`` may be written where it leaks: as is, percent-encoded (upper- and lower-case escapes),
    form-encoded, JSON-escaped, base64."""
    raw = value.encode()
    quoted = urllib.parse.quote(value, safe="")
    lower_escapes = re.sub("%[0-9A-F]{2}", lambda escape: escape.group().lower(), quoted)
    found = {raw, quoted.encode(), lower_escapes.encode(), urllib.parse.quote_plus(value).encode(),
             json.dumps(value)[1:-1].encode(), json.dumps(value)[1:-1].replace("/", "\\/").encode()}
    return found | _base64_cores(raw)


def excerpt(data: bytes, at: int, length: int, values: Iterable[str]) -> str:
    """``data`` around ``at`` with the ``length`` bytes there masked, and every form of ``values`` near it."""

    def masked(part: bytes) -> bytes:
        for value in values:
            for form in forms(value):
                part = part.replace(form, MASK.encode())
        return part

    window = EXCERPT_CHARS + 4 * max(len(v) for v in values)  # a whole secret near the edge is masked too
    before = masked(data[max(0, at - window):at])[-EXCERPT_CHARS:].decode(errors="replace")
    after = masked(data[at + length:at + length + window])[:EXCERPT_CHARS].decode(errors="replace")
    return repr(f"{before}{MASK}{after}")


@dataclass
class Search:
    """What to look for (label -> value) and what was found."""

    secrets: dict[str, str] = field(repr=False)
    hits: list[str] = field(default_factory=list)
    places: int = 0
    """How many places were searched (a search of nothing would pass)."""

    def look(self, where: str, data: bytes | str, *, allowed: Iterable[str] = ()) -> None:
        """Record every secret in ``data`` but those labelled in ``allowed``."""
        blob = data.encode(errors="replace") if isinstance(data, str) else data
        self.places += 1
        for label, value in self.secrets.items():
            if label in allowed:
                continue
            for form in forms(value):
                at = blob.find(form)
                if at >= 0:
                    self.hits.append(f"{where}: {label} ({len(form)} bytes) at {at}: {excerpt(blob, at, len(form), self.secrets.values())}")
                    break

    def look_in_files(self, root: Path, skip: Iterable[str]) -> None:
        skipped = {root / name for name in skip}
        for path in sorted(root.rglob("*")):
            if path in skipped or not path.is_file() or path.is_symlink():
                continue
            self.look(str(path.relative_to(root)), path.read_bytes())

    def report(self) -> str:
        return f"{len(self.hits)} secret(s) leaked:\n" + "\n".join(self.hits)


def test_the_search_finds_a_planted_secret_in_each_form(tmp_path: Path) -> None:
    search = Search({"the s3 secret": S3_SECRET, "the admin key": ADMIN_KEY})
    planted = {
        "raw.log": f"INFO connecting with secret_key={S3_SECRET} now",
        "url.log": f"GET http://flotilla:{urllib.parse.quote(S3_SECRET, safe='')}@127.0.0.1:8333/images",
        "lower.log": f"q={urllib.parse.quote(S3_SECRET, safe='').replace('%2F', '%2f').replace('%2B', '%2b')}",
        "json.jsonl": json.dumps({"attributes": {"auth": f"Bearer {ADMIN_KEY}", "s3": S3_SECRET}}),
        "basic.log": "authorization: Basic " + base64.b64encode(f"admin:{ADMIN_KEY}".encode()).decode(),
        "clean.log": f"INFO nothing here but {near_miss(ADMIN_KEY)[:-3]} and {TOKEN}",
    }
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "stack.json").write_text(ADMIN_KEY)
    search.look_in_files(tmp_path, skip=["stack.json"])
    where = [hit.split(":", 1)[0] for hit in search.hits]
    assert sorted(where) == ["basic.log", "json.jsonl", "json.jsonl", "lower.log", "raw.log", "url.log"], where
    shown = search.report()
    assert S3_SECRET not in shown and ADMIN_KEY not in shown and shown.count(MASK) == 8, "a secret shown"


@pytest.mark.parametrize("variable, value", [
    ("FLOTILLA_S3__SECRET", S3_SECRET),  # a misspelt name: 'Extra inputs are not permitted'
    ("FLOTILLA_ROUTER__API_KEYS", json.dumps({"key": API_KEY})),  # a mapping where a list belongs
    ("FLOTILLA_CONTROLLER__ADMIN_KEYS", json.dumps(ADMIN_KEY)),  # one key where a list of them belongs
], ids=["misspelt-s3-secret", "api-keys-mapping", "admin-keys-string"])
def test_a_configuration_error_does_not_repeat_a_secret(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `flotilla up`/`serve` print (and a pod logs) when the configuration is refused."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as caught:
        load_settings()
    search = Search({"the S3 secret key": S3_SECRET, "the API key": API_KEY, "the admin key": ADMIN_KEY})
    search.look("the configuration error", str(caught.value))
    hits, report = search.hits, search.report()
    assert not hits, report


def test_the_stack_state_shows_no_secret_in_its_repr() -> None:
    """A traceback, a log line or a test failure that shows the state shows its repr."""
    state = StackState(router="127.0.0.1:1", api_key=API_KEY, s3_endpoint="127.0.0.1:2", s3_access_key="flotilla",
                       s3_secret_key=S3_SECRET, s3_bucket="images", models=[], admin_key=ADMIN_KEY)
    search = Search({"the S3 secret key": S3_SECRET, "the API key": API_KEY, "the admin key": ADMIN_KEY})
    search.look("repr(StackState)", repr(state))
    search.look("repr(StackState.s3_settings())", repr(state.s3_settings()))
    hits, report = search.hits, search.report()
    assert not hits, report


# -- the stack -------------------------------------------------------------------


class _Records(logging.Handler):
    """Every log record of this process, formatted as the CLI's log would show it (exceptions too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Secured:
    stack: LocalStack
    records: _Records


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    settings = stack_settings(tmp_path_factory.mktemp("secrets"), triton={"replicas": 1})
    settings.router.api_keys = [SecretStr(API_KEY)]
    settings.controller.admin_keys = [SecretStr(ADMIN_KEY)]
    settings.s3.secret_key = SecretStr(S3_SECRET)
    settings.observability.tracing = True
    settings.observability.trace_exporter = "file"
    records = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with LocalStack(settings) as stack:
            yield Secured(stack, records)
    finally:
        root.removeHandler(records)
        root.setLevel(level)


# -- the traffic -------------------------------------------------------------------


@dataclass
class Answers:
    """What clients got back, by where: searched afterwards."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: object) -> None:
        self.texts.append((where, str(text)))

    async def refused(self, where: str, call: Call) -> grpc.StatusCode:
        """Await ``call``, which must fail; keep its details and metadata."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        error = caught.value
        self.add(where, f"{error.code()} {error.details()} initial={error.initial_metadata()} "
                        f"trailing={error.trailing_metadata()} debug={error.debug_error_string()}")
        return error.code()

    async def answered(self, where: str, call: Call) -> None:
        """Await ``call``, which must succeed; keep its metadata."""
        await call
        self.add(where, f"initial={await call.initial_metadata()} trailing={await call.trailing_metadata()}")

    def http(self, where: str, response: httpx.Response) -> int:
        self.add(where, f"{response.status_code} {dict(response.headers)} {response.text}")
        return response.status_code


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def classify_call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], image: str,
                  model: str = MODEL) -> Call:
    request = inference_pb2.ClassifyRequest(image_uuid=image, top_k=1).SerializeToString()
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(CLASSIFY_METHOD)
    return method(request, metadata=(*metadata, (MODEL_HEADER, model)), timeout=60)


def infer_request(image: str, model: str = MODEL) -> grpc_service_pb2.ModelInferRequest:
    tensor = grpc_service_pb2.ModelInferRequest.InferInputTensor(
        name="IMAGE_UUID", datatype="BYTES", shape=[1],
        contents=grpc_service_pb2.InferTensorContents(bytes_contents=[image.encode()]),
    )
    return grpc_service_pb2.ModelInferRequest(model_name=model, inputs=[tensor])


def infer_body(image: str) -> dict[str, object]:
    return {"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1], "data": [image]}]}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """``flotilla ARGS`` in this process: (stdout, stderr), a refusal's message included in stderr."""
    try:
        main(list(args))
    except SystemExit as exc:
        out, err = capsys.readouterr()
        return out, f"{err}\nexit: {exc.code}"
    out, err = capsys.readouterr()
    return out, err


async def accepted(channel: grpc.aio.Channel, key: str, image: str) -> bool:
    try:
        await classify_call(channel, bearer(key), image)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False
    return True


async def test_no_secret_leaves_where_it_belongs(
    secured: Secured, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = secured.stack
    assert stack.state is not None and stack.settings is not None
    state_args = ("--state", str(stack.state_file))
    answers = Answers()
    garbled = f"%%garbled/{TOKEN}=="
    missing = str(uuid.uuid4())

    # The CLI: a scoped key made (printed once), listed; a model's status; a mutation with a near-miss admin key.
    created_out, created_err = cli(capsys, "keys", *state_args, "create", "scoped", "--models", "efficientnet-*")
    created = created_out.strip()
    assert created.startswith("flt_"), (created_out, created_err)
    created_secret = created.split("_", 2)[2]
    cli_outputs = [("flotilla keys create (stderr)", created_err)]
    cli_outputs += [(f"flotilla {' '.join(a)}", "\n".join(cli(capsys, *a))) for a in (
        ("keys", *state_args, "list"),
        ("models", *state_args, "status", MODEL),
        ("models", *state_args, "list"),
    )]
    monkeypatch.setenv("FLOTILLA_ADMIN_KEY", near_miss(ADMIN_KEY))
    refused_cli = cli(capsys, "keys", *state_args, "create", "never-made", "--models", "*")
    assert "PERMISSION_DENIED" in refused_cli[1], refused_cli
    cli_outputs.append(("flotilla keys create with a near-miss admin key", "\n".join(refused_cli)))
    monkeypatch.delenv("FLOTILLA_ADMIN_KEY")
    cli_outputs.append(("flotilla models status of a model not there",
                        "\n".join(cli(capsys, "models", *state_args, "status", "no-such-model"))))

    async with FlotillaClient(stack.state.router, API_KEY, stack.settings.s3) as client:
        image = await client.upload(sample("chelsea.jpg"))
        for _ in range(2):
            answers.add("FlotillaClient.classify", await client.classify(image, MODEL, top_k=1))
        with pytest.raises(FlotillaError) as caught:
            await client.classify(missing, MODEL)
        answers.add("FlotillaClient.classify of a missing image", caught.value)
    wrong_s3 = stack.settings.s3.model_copy(update={"secret_key": SecretStr(near_miss(S3_SECRET))})
    async with FlotillaClient(stack.state.router, API_KEY, wrong_s3) as client:
        with pytest.raises(FlotillaError) as caught:
            await client.upload(sample("chelsea.jpg"))
        answers.add("FlotillaClient.upload with a near-miss S3 secret key", caught.value)

    async with grpc.aio.insecure_channel(stack.state.router) as router:
        await until(lambda: accepted(router, created, image), 5, "the router accepts the created key")
        # The Flotilla API.
        await answers.answered("Classify", classify_call(router, bearer(API_KEY), image))
        await answers.answered("Classify with the created key", classify_call(router, bearer(created), image))
        wrong = {
            "a near-miss of the API key": bearer(near_miss(API_KEY)),
            "a near-miss of the created key": bearer(near_miss(created)),
            "a garbled key": bearer(garbled),
            "the API key without Bearer": (("authorization", API_KEY),),
            "the created key without Bearer": (("authorization", created),),
            "the admin key as an API key": bearer(ADMIN_KEY),
        }
        for what, metadata in wrong.items():
            code = await answers.refused(f"Classify with {what}", classify_call(router, metadata, image))
            assert code == grpc.StatusCode.UNAUTHENTICATED, what
        code = await answers.refused("Classify of a model the key may not call",
                                     classify_call(router, bearer(created), image, OTHER_MODEL))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code = await answers.refused("Classify of a missing image", classify_call(router, bearer(API_KEY), missing))
        assert code == grpc.StatusCode.NOT_FOUND
        # KServe v2 over gRPC.
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(router)
        await answers.answered("ModelInfer", kserve.ModelInfer(infer_request(image), metadata=bearer(API_KEY),
                                                               timeout=60))
        for what, metadata in wrong.items():
            code = await answers.refused(f"ModelInfer with {what}",
                                         kserve.ModelInfer(infer_request(image), metadata=metadata, timeout=60))
            assert code == grpc.StatusCode.UNAUTHENTICATED, what
        await answers.refused("ModelInfer of a missing image",
                              kserve.ModelInfer(infer_request(missing), metadata=bearer(API_KEY), timeout=60))
        await answers.refused("ModelInfer of a model the key may not call",
                              kserve.ModelInfer(infer_request(image, OTHER_MODEL), metadata=bearer(created),
                                                timeout=60))

    # The CLI's client, once the router knows the created key.
    photo = str(SAMPLES / "chelsea.jpg")
    # `infer` runs its own event loop: in a thread of its own.
    for what, key, model in (("with the API key", API_KEY, MODEL),
                             ("with a near-miss of the API key", near_miss(API_KEY), MODEL),
                             ("of a model the key may not call", created, OTHER_MODEL)):
        args = ("infer", *state_args, "--api-key", key, "--model", model, photo)
        cli_outputs.append((f"flotilla infer {what}", "\n".join(await asyncio.to_thread(cli, capsys, *args))))

    # KServe v2 over HTTP.
    async with httpx.AsyncClient(base_url=f"http://{stack.state.router_http}", timeout=60) as http:
        path = f"/v2/models/{MODEL}/infer"
        good = {"authorization": f"Bearer {API_KEY}"}
        assert answers.http("HTTP infer", await http.post(path, json=infer_body(image), headers=good)) == 200
        assert answers.http("HTTP model metadata", await http.get(f"/v2/models/{MODEL}", headers=good)) == 200
        for what, metadata in wrong.items():
            status = answers.http(f"HTTP infer with {what}",
                                  await http.post(path, json=infer_body(image), headers=dict(metadata)))
            assert status == 401, what
        status = answers.http("HTTP infer of a missing image",
                              await http.post(path, json=infer_body(missing), headers=good))
        assert status in (400, 404)
        status = answers.http("HTTP model metadata of a model the key may not call",
                              await http.get(f"/v2/models/{OTHER_MODEL}",
                                             headers={"authorization": f"Bearer {created}"}))
        assert status == 403

    # The control plane with a near-miss admin key: the controller's and a batcher's mutations.
    with ModelsClient(stack.settings.endpoints.controller, admin_key=near_miss(ADMIN_KEY)) as models:
        for what, mutate in (("Deploy", lambda: models.deploy("never-deployed", {"storage_uri": "s3://x/y"})),
                             ("CreateKey", lambda: models.create_key("never-made", ["*"])),
                             ("RevokeKey", lambda: models.revoke_key("scoped"))):
            with pytest.raises(FlotillaError) as refused:
                mutate()
            answers.add(f"{what} with a near-miss admin key", refused.value)
    async with grpc.aio.insecure_channel(stack.batchers[MODEL].address) as channel:
        admin = batcher_pb2_grpc.BatcherAdminStub(channel)
        policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
        request = batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy)
        for what, metadata in (("a near-miss admin key", bearer(near_miss(ADMIN_KEY))),
                               ("the admin key without Bearer", (("authorization", ADMIN_KEY),)),
                               ("the API key", bearer(API_KEY))):
            await answers.refused(f"SetBatching with {what}", admin.SetBatching(request, metadata=metadata))

    # Spans are written as they end; the batcher's may trail its reply by a moment.
    traces = stack.run_dir / "traces"
    await until(lambda: {p.name for p in traces.glob("*.jsonl")} >= {"router.jsonl", "preprocess.jsonl"}, 10,
                "the router's and the worker's spans written", interval_s=0.2)

    search = Search({
        "the S3 secret key": S3_SECRET,
        "the API key": API_KEY,
        "the admin key": ADMIN_KEY,
        "the created key's secret": created_secret,
        "a presented near-miss of the API key": near_miss(API_KEY),
        "a presented near-miss of the created key's secret": near_miss(created_secret),
        "a presented near-miss of the admin key": near_miss(ADMIN_KEY),
        "a presented near-miss of the S3 secret key": near_miss(S3_SECRET),
        "a presented garbled key": garbled,
    })
    for name in BY_DESIGN:
        mode = stat.S_IMODE((stack.run_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} holds secrets and is mode {mode:o}, not 600"
    search.look_in_files(stack.run_dir, skip=BY_DESIGN)
    async with httpx.AsyncClient(timeout=10) as http:
        for name, address in stack.metrics_targets().items():
            scrape = await http.get(f"http://{address}/metrics")
            assert scrape.status_code == 200, name
            search.look(f"{name} /metrics", scrape.content)
    for where, text in answers.texts:
        search.look(f"answer to {where}", text)
    search.look("flotilla keys create (stdout)", created_out, allowed=["the created key's secret"])
    for where, text in cli_outputs:
        search.look(where, text)
    search.look("this process's log", "\n".join(secured.records.lines))
    for proc in stack.processes():
        assert proc.pid is not None
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            search.look(f"{proc.name}'s command lines", "\n".join(" ".join(p.cmdline()) for p in tree))
        except psutil.NoSuchProcess:
            pass  # restarted meanwhile: its new command line is the same
    # What `flotilla up` prints: the API key at most once (the dev key: how to call the stack); no other secret.
    described = stack.describe()
    search.look("flotilla up (LocalStack.describe)", described, allowed=["the API key"])
    assert described.count(API_KEY) <= 1, "flotilla up prints the API key more than once"

    assert search.places > 20 and len(answers.texts) > 30
    hits, report = search.hits, search.report()
    assert not hits, report
