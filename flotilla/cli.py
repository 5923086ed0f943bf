"""The ``flotilla`` command.

    flotilla up      [--config FILE]                start the local stack, wait for Ctrl-C
    flotilla run     [--config FILE] [--images DIR] start, deploy the models, classify the samples, stop
    flotilla infer   IMAGE... --model NAME          classify JPEG files on a running stack
    flotilla models  deploy|list|status|undeploy|upload ...   the model registry of a running stack
    flotilla keys    create|revoke|list ...         the routers' API keys (scoped, rate-limited)
    flotilla k8s     render [--models FILE] [--out DIR] [--check]   the cluster's generated manifests (not per model)
    flotilla serve   ROLE --config FILE --port N    run one service (the stack does this)
    flotilla top     [--interval-s S] [--once]      a live view of a running stack, from its metrics
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flotilla.config import FlotillaSettings, S3Settings, load_settings
from flotilla.errors import FlotillaError

TLS_ENV = "FLOTILLA_TLS__ENABLED"
"""Set, the CLI dials with ``FLOTILLA_TLS__*``'s files rather than the stack file's."""

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flotilla.clients.client import ClassScore
    from flotilla.clients.loadtest import Row
    from flotilla.clients.models import ModelsClient
    from flotilla.common.tls import Dialer
    from flotilla.stack.state import StackState

DEFAULT_CONFIG = Path("flotilla.yaml")
DEFAULT_STATE = Path(".flotilla/stack.json")
DEFAULT_SAMPLES = Path("build/samples")


def _settings(path: Path | None) -> FlotillaSettings:
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    try:
        return load_settings(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"invalid configuration{f' in {path}' if path else ''}:\n{exc}") from exc


def _running_state(path: Path) -> StackState:
    """The running stack's stack.json; exits saying why when the stack is not running."""
    from flotilla.stack.state import StackNotRunning, read_running

    try:
        return read_running(path)
    except StackNotRunning as exc:
        raise SystemExit(str(exc)) from exc


def format_classification(title: str, classes: Sequence[ClassScore]) -> str:
    lines = [title]
    for rank, c in enumerate(classes, 1):
        lines.append(f"  {rank}. {c.label:<28} {c.score:7.4f}  (class {c.index})")
    return "\n".join(lines)


async def _classify_files(
    router: str, api_key: str, s3: S3Settings, model: str, files: list[Path], top_k: int, dialer: Dialer
) -> int:
    """Upload and classify ``files`` on one ClassifyStream (``classify_many``); print each in the
    order given, as the ones before it are done. Returns how many failed."""
    from flotilla.clients.client import FlotillaClient

    texts: dict[int, str] = {}
    readable: list[tuple[int, bytes]] = []
    for index, path in enumerate(files):
        try:
            readable.append((index, path.read_bytes()))
        except OSError as exc:
            texts[index] = f"{path.name}: FAILED to read: {exc}"
    failures = len(texts)
    shown = 0

    def show_ready() -> None:
        nonlocal shown
        while shown in texts:
            print(texts.pop(shown), flush=True)
            shown += 1

    show_ready()
    async with FlotillaClient(router, api_key, s3, dialer=dialer) as client:
        async for result in client.classify_many([jpeg for _, jpeg in readable], model, top_k=top_k):
            index = readable[result.index][0]
            name = files[index].name
            if result.error is not None:
                failures += 1
                texts[index] = f"{name}: FAILED ({result.error.code.name}) {result.error.message}"
            else:
                title = f"{name}  [{model}, image {result.image_uuid}]"
                texts[index] = format_classification(title, result.unwrap().classes)
            show_ready()
    return failures


def cmd_serve(args: argparse.Namespace) -> None:
    from flotilla.common import tracing

    settings = _settings(args.config)
    if args.metrics_port is not None:
        from flotilla.common.metrics import serve_metrics

        serve_metrics(settings.host, args.metrics_port)
    service = f"{args.role}-{args.model}" if args.model else args.role
    tracing.setup(settings.observability, service, file_dir=settings.observability.trace_dir)
    try:
        _serve_role(args, settings)
    finally:
        tracing.shutdown()


def _serve_role(args: argparse.Namespace, settings: FlotillaSettings) -> None:
    from flotilla.common.server import run_service

    if args.role == "controller":
        from flotilla.services.controller.server import serve as serve_controller

        run_service(serve_controller(settings, args.port), settings.event_loop)
    elif args.role == "router":
        from flotilla.services.router.server import serve as serve_router

        run_service(serve_router(settings, args.port), settings.event_loop)
    elif args.role == "batcher":
        from flotilla.services.batcher.server import serve as serve_batcher

        # A shard hosts the queues of the models the controller gives it; --model: a dedicated batcher.
        run_service(serve_batcher(settings, args.port, dedicated_model=args.model or ""), settings.event_loop)
    else:
        from flotilla.services.preprocess.server import serve as serve_preprocess

        run_service(serve_preprocess(settings, args.port), settings.event_loop)


def cmd_up(args: argparse.Namespace) -> None:
    from flotilla.stack.local import LocalStack

    settings = _settings(args.config)
    if args.prometheus:
        settings.observability.prometheus = True
    if args.tls:
        settings.tls.enabled = True
    print("starting the local stack ...", flush=True)
    with LocalStack(settings) as stack:
        print(stack.describe())
        if stack.prometheus is not None:
            print(f"Prometheus:          http://{stack.prometheus.address}")
        if settings.models:
            print(f"\nclassify: flotilla infer IMAGE.jpg --model {next(iter(settings.models))}")
        print("Ctrl-C stops the stack.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # Ctrl-C (SIGINT) stops it even when it started with SIGINT ignored, as `flotilla up &` in a
        # script has it: Python then installs no handler of its own and the SIGINT would be lost.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", flush=True)


# What `flotilla run` shows: which sample photos go through which model.
RUN_PLAN = {
    "efficientnet-lite0": ["*.jpg"],
    "open-nsfw": ["chelsea.jpg", "coffee.jpg"],
    "document-orientation": ["documents/page-rot*.jpg"],
}


def cmd_run(args: argparse.Namespace) -> None:
    from flotilla.stack.local import LocalStack

    settings = _settings(args.config)
    plan = {args.model: ["*.jpg"]} if args.model else {m: RUN_PLAN.get(m, ["*.jpg"]) for m in settings.models}
    batches = {m: sorted({p for pattern in patterns for p in args.images.glob(pattern)}) for m, patterns in plan.items()}
    if not any(batches.values()):
        raise SystemExit(f"no sample photos in {args.images}; run `make models` to write them")
    print(f"starting the local stack (Triton x{settings.triton.replicas}, "
          f"{settings.preprocess.workers} preprocess worker(s)) and deploying "
          f"{len(settings.models)} model(s) through the registry ...", flush=True)
    failures = 0
    with LocalStack(settings) as stack:
        assert stack.state is not None and stack.settings is not None
        print(stack.describe(), "\n", flush=True)
        with stack.models_client() as client:
            from flotilla.clients.models import format_list

            print(format_list(client.list()), "\n", flush=True)
        for model, images in batches.items():
            if not images:
                continue
            print(f"== {model} ==", flush=True)
            failures += asyncio.run(_classify_files(
                stack.state.router, stack.state.api_key, stack.settings.s3, model, images, args.top_k,
                stack.dialer,
            ))
            print(flush=True)
        print("stopping the local stack ...", flush=True)
    if failures:
        raise SystemExit(f"{failures} image(s) failed")


def cmd_infer(args: argparse.Namespace) -> None:
    state = _running_state(args.state)
    s3 = state.s3_settings()
    router = args.router or state.router
    api_key = args.api_key or os.environ.get("FLOTILLA_API_KEY") or state.api_key
    failures = asyncio.run(_classify_files(router, api_key, s3, args.model, args.images, args.top_k, state.dialer()))
    if failures:
        raise SystemExit(1)


def _models_client(args: argparse.Namespace) -> tuple[ModelsClient, StackState | None]:
    """A client of the controller named by --controller or the stack file, with the admin key of
    ``$FLOTILLA_ADMIN_KEY`` or else the stack file's (mutations need it; reads do not)."""
    from flotilla.clients.models import ModelsClient
    from flotilla.common.admin import admin_key_from_env

    admin_key = admin_key_from_env()
    if args.controller:
        if admin_key is None and args.state.exists():
            from flotilla.stack.state import StackState

            try:
                admin_key = StackState.read(args.state).admin_key or None
            except (OSError, ValueError, TypeError):
                admin_key = None
        return ModelsClient(args.controller, admin_key=admin_key, dialer=_env_dialer()), None
    state = _running_state(args.state)
    dialer = _env_dialer() if os.environ.get(TLS_ENV) else state.dialer()
    return ModelsClient(state.controller, admin_key=admin_key or state.admin_key or None, dialer=dialer), state


def _env_dialer() -> Dialer:
    """TLS as ``FLOTILLA_TLS__*`` say (a mesh elsewhere, e.g. Kubernetes with an admin certificate)."""
    from flotilla.common.tls import Dialer

    return Dialer(FlotillaSettings().tls)


def cmd_keys(args: argparse.Namespace) -> None:
    from flotilla.clients import keys as keys_cli

    client, _ = _models_client(args)
    keys_cli.cmd_keys(args, client)


def cmd_models(args: argparse.Namespace) -> None:
    import yaml
    from pydantic import ValidationError

    from flotilla.clients.models import format_list, format_status, missing_labels, upload_artifact
    from flotilla.config import ModelSettings

    client, state = _models_client(args)
    try:
        with client:
            if args.action == "list":
                print(format_list(client.list()))
            elif args.action == "status":
                print(format_status(client.status(args.name), client.statistics(args.name)))
            elif args.action == "undeploy":
                client.undeploy(args.name)
                print(f"undeployed {args.name}")
            elif args.action == "upload":
                if state is None:
                    raise SystemExit("models upload needs the stack's S3 credentials: pass --state, not --controller")
                uri = args.storage_uri or f"s3://{state.artifact_bucket}/{args.name}"
                files = upload_artifact(state.s3_settings(), args.directory, uri)
                print(f"uploaded {len(files)} file(s) to {uri}: {', '.join(sorted(files))}")
                warning = missing_labels(args.directory, files)
                if warning:
                    print(f"warning: {warning}", file=sys.stderr)
            elif args.action == "deploy":
                data = yaml.safe_load(args.spec.read_text(encoding="utf-8")) if args.spec else {}
                data = data or {}
                flags = {
                    "storage_uri": args.storage_uri, "framework": args.framework, "memory_mb": args.memory,
                    "min_copies": args.min_copies, "max_copies": args.max_copies,
                    "versions": args.version and [args.version],
                }
                data.update({k: v for k, v in flags.items() if v is not None})
                try:
                    spec = ModelSettings.model_validate(data)
                except ValidationError as exc:
                    raise SystemExit(f"invalid model spec: {exc}") from exc
                status = client.deploy(args.name, spec, replace=args.replace)
                print(format_status(status))
    except FlotillaError as exc:
        raise SystemExit(f"{exc.code.name}: {exc.message}") from exc


_MIB = 1024**2
MEMORY_UNITS: dict[str, float] = {
    **{unit: 1 / 1024 for unit in ("Ki", "KiB")},
    **{unit: 1.0 for unit in ("Mi", "MiB")},
    **{unit: 1024.0 for unit in ("Gi", "GiB")},
    **{unit: 1000 / _MIB for unit in ("k", "K", "kB", "KB")},
    **{unit: 1000**2 / _MIB for unit in ("M", "MB")},
    **{unit: 1000**3 / _MIB for unit in ("G", "GB")},
}
"""Memory units -> MiB. Binary with an ``i`` (1 Mi = 1 MiB = 1024² bytes), decimal without one
(1 M = 1 MB = 1000² bytes), as Kubernetes quantities and disk sizes read them."""
_MEMORY_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_memory_mb(text: str) -> float:
    """``300Mi``, ``300MiB``, ``1.5Gi``, ``300M``, ``300MB`` or ``300`` (MiB) -> MiB.

    An unknown unit fails naming the accepted ones (argparse prints the message).
    """
    match = _MEMORY_SIZE.fullmatch(text)
    if match is None or (match[2] and match[2] not in MEMORY_UNITS):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size; use a number with one of Ki, KiB, Mi, MiB, Gi, GiB "
            "(binary: 1 Mi = 2^20 bytes) or K, KB, M, MB, G, GB (decimal: 1 M = 10^6 bytes), "
            "or a bare number of MiB: e.g. 300Mi, 1.5Gi, 300MB"
        )
    return float(match[1]) * MEMORY_UNITS.get(match[2], 1.0)


def cmd_loadtest(args: argparse.Namespace) -> None:
    from flotilla.clients import loadtest

    state = _running_state(args.state)
    try:
        batch_sizes = loadtest.parse_list(args.batch_sizes)
        points = loadtest.parse_list(args.concurrency if args.mode == "closed" else args.rates,
                                     int if args.mode == "closed" else float)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    if not images:
        raise SystemExit(f"no *.jpg files in {args.images}")
    rows = asyncio.run(_loadtest(args, state, images, batch_sizes, points))
    loadtest.write_csv(rows, args.out / "results.csv")
    loadtest.plot(rows, args.out / "loadtest.png", f"{args.model}: throughput vs p99 latency")
    print(loadtest.format_table(rows))
    print(f"\nwrote {args.out / 'results.csv'} and {args.out / 'loadtest.png'}")


async def _loadtest(
    args: argparse.Namespace, state: StackState, images: list[bytes], batch_sizes: list[int], points: Sequence[float]
) -> list[Row]:
    from tqdm import tqdm

    from flotilla.clients import loadtest

    target = loadtest.StackTarget(state)
    rows = []
    try:
        uuids = await target.upload_images(images, copies=4)
        original = await target.max_batch_size(args.model)
        plans = [("mesh", bs) for bs in batch_sizes] + ([("baseline", 1)] if args.baseline else [])
        with tqdm(total=len(plans) * len(points), unit="point", desc="load test") as bar:
            for mode, bs in plans:
                if mode == "mesh":
                    await target.set_max_batch_size(args.model, bs)
                for value in points:
                    closed = args.mode == "closed"  # points are concurrencies, else request rates
                    if mode == "mesh":
                        call = target.api_call(args.api, args.model, uuids, concurrency=int(value) if closed else 1)
                    else:
                        call = target.direct_call(args.model + loadtest.BASELINE_SUFFIX, uuids)
                    rows.append(await loadtest.measure(
                        target, mode=mode, model=args.model, max_batch_size=bs, call=call,
                        duration_s=args.duration_s, api=args.api,
                        concurrency=int(value) if closed else 0, rate_per_s=0.0 if closed else value,
                    ))
                    await target.apis.close_streams()  # a stream point's streams end with it
                    bar.set_postfix(img_s=rows[-1].throughput_per_s, p99_ms=rows[-1].p99_ms)
                    bar.update(1)
        await target.set_max_batch_size(args.model, original)
    finally:
        await target.close()
    return rows


def cmd_bench(args: argparse.Namespace) -> None:
    # The bench is imported here only: nothing else the CLI runs loads it.
    if args.against:
        from flotilla.bench import ab

        ab.run(args.against, args.only, rounds=args.rounds, duration_s=args.duration_s)
        return
    from flotilla.bench import run

    run.main(duration_s=args.duration_s, only=args.only)


def cmd_top(args: argparse.Namespace) -> None:
    from flotilla.clients import top

    if args.interval_s <= 0:
        raise SystemExit("--interval-s must be positive")
    targets = top.Targets(args.state.parent / top.TARGETS_FILE, _running_state(args.state).metrics)
    if not targets.current():
        raise SystemExit(f"the stack of {args.state} lists no metrics endpoints; restart it with `flotilla up`")
    try:
        top.run(targets, args.interval_s, once=args.once, out=sys.stdout)
    except KeyboardInterrupt:
        print()


def cmd_k8s(args: argparse.Namespace) -> None:
    from flotilla import k8s

    scaling = k8s.BatcherScaling(min_replicas=args.batcher_min_replicas, max_replicas=args.batcher_max_replicas)
    if not 1 <= scaling.min_replicas <= scaling.max_replicas:
        raise SystemExit("flotilla k8s render: need 1 <= --batcher-min-replicas <= --batcher-max-replicas")
    try:
        rendered = k8s.render(args.out, args.observability, models=args.models, scaling=scaling)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"flotilla k8s render: {exc}") from exc
    if args.check:
        stale = k8s.stale(args.out, rendered)
        if stale:
            raise SystemExit(f"stale, run `flotilla k8s render`: {', '.join(map(str, stale))}")
        print(f"{len(rendered)} generated file(s) up to date")
        return
    changed = k8s.write(args.out, rendered)
    for rel in rendered:
        print(f"{'wrote' if rel in changed else 'unchanged'} {args.out / rel}")


def build_parser() -> argparse.ArgumentParser:
    from flotilla.k8s import BatcherScaling  # the render's defaults (yaml and the settings, no grpc)

    parser = argparse.ArgumentParser(prog="flotilla", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one Flotilla service")
    serve.add_argument("role", choices=["controller", "router", "batcher", "preprocess"])
    serve.add_argument("--config", type=Path, help="YAML configuration")
    serve.add_argument("--port", type=int, required=True, help="port to bind on settings.host")
    serve.add_argument("--model", help="batcher: serve this model alone (a dedicated batcher, for a model whose spec "
                                       "sets dedicated_batcher); without it the batcher is a shard the controller "
                                       "gives models to")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on settings.host:PORT/metrics")
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help="start the local stack until Ctrl-C")
    up.add_argument("--config", type=Path, help=f"YAML configuration (default: {DEFAULT_CONFIG} if present)")
    up.add_argument("--prometheus", action="store_true",
                    help="also start Prometheus scraping every service (or set observability.prometheus)")
    up.add_argument("--tls", action="store_true",
                    help="TLS on every hop: a throwaway CA and per-service certificates in the run directory "
                         "(or set tls.enabled)")
    up.set_defaults(func=cmd_up)

    run = sub.add_parser("run", help="start the stack, classify sample photos, stop")
    run.add_argument("--config", type=Path, help=f"YAML configuration (default: {DEFAULT_CONFIG} if present)")
    run.add_argument("--images", type=Path, default=DEFAULT_SAMPLES, help="folder of .jpg files")
    run.add_argument("--model", help="classify every sample with this model only (default: each model its photos)")
    run.add_argument("--top-k", type=int, default=5)
    run.set_defaults(func=cmd_run)

    infer = sub.add_parser("infer", help="classify JPEG files on a running stack")
    infer.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    infer.add_argument("--model", required=True)
    infer.add_argument("--top-k", type=int, default=5)
    infer.add_argument("--state", type=Path, default=DEFAULT_STATE, help="stack.json written by `flotilla up`")
    infer.add_argument("--router", help="router host:port (default: from --state)")
    infer.add_argument("--api-key", help="API key (default: $FLOTILLA_API_KEY, then --state)")
    infer.set_defaults(func=cmd_infer)

    models = sub.add_parser("models", help="the model registry of a running stack")
    models.add_argument("--state", type=Path, default=DEFAULT_STATE, help="stack.json written by `flotilla up`")
    models.add_argument("--controller", help="controller host:port (default: from --state)")
    msub = models.add_subparsers(dest="action", required=True)
    deploy = msub.add_parser("deploy", help="register a model and place its copies")
    deploy.add_argument("name")
    deploy.add_argument("--storage-uri", help="s3://bucket/prefix holding <version>/model.onnx")
    deploy.add_argument("--framework", help="artifact format (onnx)")
    deploy.add_argument("--memory", type=parse_memory_mb, help="memory of one copy: 300Mi, 1.5Gi (binary), 300MB (decimal) or 300 (MiB)")
    deploy.add_argument("--version", type=int, help="the version to serve (default: the spec's versions)")
    deploy.add_argument("--min-copies", type=int)
    deploy.add_argument("--max-copies", type=int)
    deploy.add_argument("--spec", type=Path, help="YAML: input/output/labels/batching spec (ModelSettings)")
    deploy.add_argument("--replace", action="store_true", help="replace a registered model of that name")
    msub.add_parser("list", help="every registered model")
    status = msub.add_parser("status", help="conditions, placement and decisions of one model")
    status.add_argument("name")
    undeploy = msub.add_parser("undeploy", help="unload every copy and remove the model")
    undeploy.add_argument("name")
    upload = msub.add_parser("upload", help="put a local model directory into the object store")
    upload.add_argument("name")
    upload.add_argument("directory", type=Path,
                        help="holds <version>/model.onnx and optionally labels.txt (beside the version directories)")
    upload.add_argument("--storage-uri", help="default: s3://<artifact bucket>/<name>")
    models.set_defaults(func=cmd_models)

    from flotilla.clients import keys as keys_cli

    keys_cli.add_parser(sub, DEFAULT_STATE).set_defaults(func=cmd_keys)

    lt = sub.add_parser("loadtest", help="sweep batch sizes and load against a running stack")
    lt.add_argument("--model", default="efficientnet-lite0")
    lt.add_argument("--mode", choices=["closed", "open"], default="closed",
                    help="closed: fixed concurrency; open: Poisson arrivals at fixed rates")
    lt.add_argument("--concurrency", default="1,4,16,64", help="closed loop: comma-separated concurrencies")
    lt.add_argument("--rates", default="10,25,50", help="open loop: comma-separated requests/s")
    lt.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="batcher max_batch_size values to sweep")
    lt.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per point")
    lt.add_argument("--api", choices=["unary", "stream", "kserve-grpc", "kserve-http"], default="unary",
                    help="the router's front door: unary Classify calls, requests on one ClassifyStream "
                         "(a closed loop's concurrency is the requests in flight on it), or KServe v2 "
                         "ModelInfer over gRPC or HTTP (one image per request)")
    lt.add_argument("--baseline", action="store_true",
                    help="also run the no-batching-tier baseline (needs <model>-tritonbatch; see bench/flotilla-bench.yaml)")
    lt.add_argument("--images", type=Path, default=DEFAULT_SAMPLES)
    lt.add_argument("--state", type=Path, default=DEFAULT_STATE)
    lt.add_argument("--out", type=Path, default=Path("loadtest-results"))
    lt.set_defaults(func=cmd_loadtest)

    bench = sub.add_parser("bench", help="the benchmark `make bench` runs")
    bench.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per load point")
    bench.add_argument("--only", choices=["all", "fleet", "fleet-sim", "idle-fleet", "cpu", "overhead", "ceiling",
                                          "peer"],
                       default="all",
                       help="fleet: only the control-plane part (cold start, placement, autoscaling); "
                            "fleet-sim: the real controller core at 1 000 and 10 000 models on simulated time "
                            "(not part of all); idle-fleet: what 1 000 idle models cost the local stack's "
                            "controller, router and shard (not part of all); "
                            "cpu: CPU per image by tier and mesh_vs_limit; overhead: the near-free-model mesh "
                            "against Triton alone; ceiling: the router and a batcher alone at their limits; "
                            "peer: the CPU part's job on Ray Serve (the peer extra)")
    bench.add_argument("--against", metavar="REV",
                       help="measure the --only part (cpu, overhead or ceiling) on git revision REV and on this "
                            "checkout alternately, in worktrees under .flotilla/ab/, and report head / base; "
                            "writes nothing in this checkout's docs/benchmarks.md or bench/")
    bench.add_argument("--rounds", type=int, default=2, help="with --against: runs of each side, alternating")
    bench.set_defaults(func=cmd_bench)

    top = sub.add_parser("top", help="a live view of a running stack, from its metrics")
    top.add_argument("--state", type=Path, default=DEFAULT_STATE, help="stack.json written by `flotilla up`")
    top.add_argument("--interval-s", type=float, default=1.0, help="seconds between refreshes (rates cover this window)")
    top.add_argument("--once", action="store_true", help="print one frame (two scrapes --interval-s apart) and exit")
    top.set_defaults(func=cmd_top)

    kube = sub.add_parser("k8s", help="the generated Kubernetes manifests")
    ksub = kube.add_subparsers(dest="action", required=True)
    render = ksub.add_parser(
        "render", help="the cluster's configuration (ConfigMap with its endpoints), Triton's memory limit, the "
                       "batcher shards and dedicated batchers, alerts and dashboard; models deploy at run time "
                       "(flotilla models deploy), with no render")
    render.add_argument("--models", type=Path,
                        help="take only the models: of this flotilla YAML (default: those of OUT/base/flotilla.yaml); "
                             "the cluster's host, s3 and the rest stay")
    render.add_argument("--out", type=Path, default=Path("k8s"), help="the kustomize tree to write into")
    render.add_argument("--observability", type=Path, default=Path("observability"),
                        help="holds prometheus/alerts.yml and grafana/flotilla.json")
    shards = BatcherScaling()  # the shards' HPA bounds; a dedicated batcher's stay BatcherScaling's
    render.add_argument("--batcher-min-replicas", type=int, default=shards.min_replicas,
                        help="the batcher shards' HPA: fewest shards (default: %(default)s)")
    render.add_argument("--batcher-max-replicas", type=int, default=shards.max_replicas,
                        help="the batcher shards' HPA: most shards (default: %(default)s)")
    render.add_argument("--check", action="store_true", help="write nothing; fail when a generated file is stale")
    render.set_defaults(func=cmd_k8s)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.func(args)
