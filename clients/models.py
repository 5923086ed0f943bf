"""Operator client for the control plane: deploy, list, status, undeploy, upload; API keys.

    client = ModelsClient("127.0.0.1:50100", admin_key=key)
    client.deploy("open-nsfw", spec)            # spec: flotilla.config.ModelSettings
    print(format_status(client.status("open-nsfw")))
    token = client.create_key("ci", ["efficientnet-*"], rate_per_s=100).token   # shown once

Mutating calls (deploy, undeploy, create_key, revoke_key) send ``admin_key`` as
``authorization: Bearer <admin key>`` (``flotilla.common.admin``); the read-only ones need none.

Blocking (the CLI and the local stack's start-up use it). Failures raise a
``FlotillaError`` with the controller's status and reason.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.common.admin import admin_metadata
from flotilla.common.object_store import ObjectStore
from flotilla.common.status import error_from_rpc
from flotilla.common.tls import PLAINTEXT, Dialer
from flotilla.common.wire import CONTROL_CHANNEL_OPTIONS
from flotilla.config import ModelSettings, S3Settings, deploy_json
from flotilla.errors import FlotillaError
from flotilla.services.controller.artifacts import LABELS_FILE, ArtifactStore

DEPLOY_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 30.0


def upload_artifact(s3: S3Settings, local_dir: Path, storage_uri: str) -> dict[str, dict[str, object]]:
    """Put a local model directory (``<version>/model.onnx``, labels.txt) at ``storage_uri``.

    labels.txt goes beside the version directories; one put in them is taken
    when they agree, rejected (InvalidArgument saying where it belongs) when
    they do not. ``missing_labels`` says what an upload without one means.
    """
    artifacts = ArtifactStore(lambda bucket: ObjectStore(s3.model_copy(update={"bucket": bucket}), timeout_s=60.0))
    return artifacts.upload(local_dir, storage_uri)


def missing_labels(local_dir: Path, files: dict[str, dict[str, object]]) -> str | None:
    """A warning when an upload of ``local_dir`` (which returned ``files``) carried no labels.txt."""
    if LABELS_FILE in files:
        return None
    return (
        f"{local_dir} has no {LABELS_FILE}: the model's classes will be shown as numbers; put one class "
        f"name per line in {local_dir / LABELS_FILE} and upload again, or give labels in the spec"
    )


class ModelsClient:
    def __init__(self, controller: str, admin_key: str | None = None, *, dialer: Dialer = PLAINTEXT) -> None:
        """``dialer``: TLS (and this client's certificate, an admin identity's with TLS on) when the mesh
        runs with it."""
        self.controller = controller
        self._admin = admin_metadata(admin_key)
        self._channel = dialer.channel(controller, CONTROL_CHANNEL_OPTIONS)
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)

    def __enter__(self) -> ModelsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: Callable[..., Any], request: Message, timeout_s: float = CALL_TIMEOUT_S, *, admin: bool = False
    ) -> Any:
        """``method``'s answer to ``request`` (the generated stubs are untyped: callers name its type);
        ``admin``: with the admin key."""
        try:
            return method(request, timeout=timeout_s, metadata=self._admin if admin else None)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: grpc.RpcError) -> FlotillaError:
        assert isinstance(exc, grpc.Call)  # a blocking call's RpcError is also its Call (code, details)
        return error_from_rpc(exc, f"controller {self.controller}")

    def deploy(
        self, name: str, spec: ModelSettings | dict[str, object], *, replace: bool = False
    ) -> controller_pb2.ModelStatus:
        """``spec`` as settings, or as plain data the controller validates. The input/output settings
        the spec leaves unset are not sent: the controller reads them from the model's graph."""
        spec_json = deploy_json(spec) if isinstance(spec, ModelSettings) else json.dumps(spec)
        request = controller_pb2.DeployRequest(name=name, spec_json=spec_json, replace=replace)
        status: controller_pb2.ModelStatus = self._call(self._stub.Deploy, request, DEPLOY_TIMEOUT_S, admin=True)
        return status

    def undeploy(self, name: str) -> None:
        self._call(self._stub.Undeploy, controller_pb2.UndeployRequest(name=name), DEPLOY_TIMEOUT_S, admin=True)

    def create_key(
        self, name: str, models: list[str], *, rate_per_s: float = 0.0, burst: int = 0, expires_unix_s: float = 0.0
    ) -> controller_pb2.CreateKeyResponse:
        """A new API key: the answer's ``token`` is the key, which nothing keeps (show it once)."""
        request = controller_pb2.CreateKeyRequest(
            name=name, models=models, rate_per_s=rate_per_s, burst=burst, expires_unix_s=expires_unix_s
        )
        created: controller_pb2.CreateKeyResponse = self._call(self._stub.CreateKey, request, admin=True)
        return created

    def revoke_key(self, name: str) -> None:
        self._call(self._stub.RevokeKey, controller_pb2.RevokeKeyRequest(name=name), admin=True)

    def list_keys(self) -> list[controller_pb2.ApiKey]:
        """Every key's name, scope, quota and last use (never a key or its hash)."""
        listed: controller_pb2.ListKeysResponse = self._call(self._stub.ListKeys, controller_pb2.ListKeysRequest())
        return list(listed.keys)

    def list(self) -> list[controller_pb2.ModelStatus]:
        request = controller_pb2.ListModelsRequest()
        models: controller_pb2.ListModelsResponse = self._call(self._stub.ListModels, request)
        return list(models.models)

    def status(self, name: str) -> controller_pb2.ModelStatus:
        status: controller_pb2.ModelStatus = self._call(self._stub.GetModel, controller_pb2.GetModelRequest(name=name))
        return status

    def statistics(self, name: str) -> controller_pb2.ModelRequestStatistics:
        """The model's request counters over the fleet's batching tier since the controller started."""
        request = controller_pb2.GetModelStatisticsRequest(name=name)
        listed: controller_pb2.ModelStatisticsList = self._call(self._stub.GetModelStatistics, request)
        return listed.models[0]

    def ensure_loaded(self, name: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> controller_pb2.ModelStatus:
        request = controller_pb2.EnsureLoadedRequest(name=name)
        status: controller_pb2.ModelStatus = self._call(self._stub.EnsureLoaded, request, timeout_s)
        return status

    def fleet(self) -> controller_pb2.Fleet:
        """The current fleet (the first snapshot of the watch stream)."""
        stream = self._stub.WatchFleet(controller_pb2.WatchFleetRequest(), timeout=CALL_TIMEOUT_S)
        try:
            fleet: controller_pb2.Fleet = next(iter(stream))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()
        return fleet


def _when(unix_s: float) -> str:
    if not unix_s:
        return "never"
    return datetime.datetime.fromtimestamp(unix_s).strftime("%H:%M:%S")


def format_list(models: list[controller_pb2.ModelStatus]) -> str:
    rows = [f"{'NAME':<24} {'READY':<6} {'COPIES':<8} {'MEMORY':>9}  {'VERSION':<8} {'LAST USED':<9} STORAGE"]
    for m in models:
        spec = json.loads(m.spec_json)
        ready = next((c.status for c in m.conditions if c.type == "Ready" and not c.replica), "Unknown")
        loaded = sum(c.state == "ready" for c in m.copies)
        copies = f"{loaded}/{spec['min_copies']}-{spec['max_copies']}"
        memory = f"{m.memory_mb:.0f}{'' if m.memory_measured else '*'} MiB"
        rows.append(f"{m.name:<24} {ready:<6} {copies:<8} {memory:>9}  {m.default_version:<8} "
                    f"{_when(m.last_used_unix_s):<9} {spec['storage_uri']}")
    rows.append("(* declared memory, not yet measured; COPIES = ready/min-max)")
    return "\n".join(rows)


def _quota(key: controller_pb2.ApiKey) -> str:
    if not key.rate_per_s:
        return "unlimited"
    burst = key.burst or max(1, int(key.rate_per_s + 0.999999))
    return f"{key.rate_per_s:g}/s burst {burst}"


def _date(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M") if unix_s else "never"


def format_keys(keys: list[controller_pb2.ApiKey]) -> str:
    """``flotilla keys list``: names, scopes, quotas, expiry and last use; never a key."""
    rows = [f"{'NAME':<24} {'ID':<17} {'QUOTA':<20} {'EXPIRES':<17} {'LAST USED':<17} MODELS"]
    for k in keys:
        rows.append(f"{k.name:<24} {k.id:<17} {_quota(k):<20} {_date(k.expires_unix_s):<17} "
                    f"{_date(k.last_used_unix_s):<17} {', '.join(k.models)}")
    if not keys:
        rows.append("(no keys; `flotilla keys create NAME --models GLOB` makes one)")
    return "\n".join(rows)


def _input(i: dict[str, Any]) -> str:
    """``'x' FP32 NCHW 320x320 RGB, stretch, ...``: the input tensor and how a JPEG becomes it."""
    resize = f"{i['resize']} via {i['resize_px']} px" if i["resize_px"] else str(i["resize"])
    text = f"{i['name']!r} {i['dtype']} {i['layout']} {i['height_px']}x{i['width_px']} {i['channel_order']}, {resize}"
    if i["dtype"] == "FP32":
        text += f", scale {i['scale']:g}, mean {list(i['mean'])}, std {list(i['std'])}"
    return text


def format_requests(counted: controller_pb2.ModelRequestStatistics) -> str:
    """``flotilla models status``'s requests line: what the batching tier answered since the controller started."""
    answered = counted.succeeded_total + counted.failed_total
    if not answered:
        return "none answered since the controller started"
    per_batch = counted.dispatched_total / counted.batches_total if counted.batches_total else 0.0
    mean_ms = (counted.success_s_total + counted.fail_s_total) / answered * 1000.0
    queue_ms = counted.queue_wait_s_total / counted.dispatched_total * 1000.0 if counted.dispatched_total else 0.0
    return (f"{answered} answered ({counted.succeeded_total} ok, {counted.failed_total} failed) in "
            f"{counted.batches_total} batches ({per_batch:.1f} a batch); mean {mean_ms:.1f} ms in the batching tier, "
            f"{queue_ms:.1f} ms of it queued (since the controller started)")


BATCH_SIZES_SHOWN = 6
"""``flotilla models status``'s batches line names this many sizes (the most frequent), then how many more."""


def format_batch_sizes(counted: controller_pb2.ModelRequestStatistics) -> str:
    """``flotilla models status``'s batches line: how often each batch size ran and its mean time at a worker
    and Triton, the most frequent first."""
    sizes = sorted(counted.batch_sizes, key=lambda c: (-c.batches_total, -c.size))
    if not sizes:
        return "none ran since the controller started"
    shown = [f"{c.size} x {c.batches_total} ({c.compute_s_total / c.batches_total * 1000.0:.1f} ms)"
             for c in sizes[:BATCH_SIZES_SHOWN] if c.batches_total]
    more = len(sizes) - BATCH_SIZES_SHOWN
    return "size x batches (mean time): " + ", ".join(shown) + (f", and {more} more sizes" if more > 0 else "")


def format_status(m: controller_pb2.ModelStatus, counted: controller_pb2.ModelRequestStatistics | None = None) -> str:
    """``flotilla models status``: the model's spec, placement, conditions and events, and with ``counted``
    its requests."""
    spec = json.loads(m.spec_json)
    lines = [
        f"model:      {m.name}",
        f"storage:    {spec['storage_uri']}  ({spec['framework']}, versions {spec['versions']}, default {m.default_version})",
        f"input:      {_input(spec['input'])}",
        f"output:     {spec['output_name']!r} ({spec['output_kind']}), {len(spec['labels']) or 'no'} labels",
        f"memory:     {m.memory_mb:.0f} MiB ({'measured' if m.memory_measured else 'declared'})",
        f"copies:     min {spec['min_copies']}, max {spec['max_copies']}",
        f"batchers:   {', '.join(m.batchers) or 'none'}",
        f"queue wait: {m.queue_wait_ms:.1f} ms (last interval); last used {_when(m.last_used_unix_s)}",
        *([f"requests:   {format_requests(counted)}", f"batches:    {format_batch_sizes(counted)}"]
          if counted is not None else []),
        "placement:",
    ]
    lines += [f"  {c.replica:<22} {c.state:<11} versions {list(c.versions)}  {c.memory_mb:.0f} MiB" for c in m.copies]
    if not m.copies:
        lines.append("  (no copy loaded)")
    lines.append("conditions:")
    for c in m.conditions:
        where = f" [{c.replica}]" if c.replica else ""
        lines.append(f"  {c.type + where:<44} {c.status:<7} {c.reason:<16} {c.message}  (since {_when(c.last_transition_unix_s)})")
    lines.append("events (oldest first):")
    lines += [f"  {_when(e.unix_s)} {e.kind:<16} {e.message}" for e in m.events]
    return "\n".join(lines)
