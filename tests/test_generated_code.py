"""The committed protobuf/gRPC code is exactly what `make generate` produces."""

from __future__ import annotations

from pathlib import Path

from flotilla.api.generate import generate

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh
    stale = [str(rel) for rel, data in fresh.items() if (REPO / rel).read_bytes() != data]
    assert stale == [], f"stale generated code (run `make generate`): {stale}"


def test_the_kserve_module_lives_beside_tritonclients() -> None:
    """Both declare inference.* names; ours is in a descriptor pool of its own, so both import in one process."""
    import tritonclient.grpc  # noqa: F401  (registers inference.* in the default pool)

    from flotilla.api.kserve import grpc_service_pb2

    ours = grpc_service_pb2.ServerLiveResponse(live=True).SerializeToString()
    assert tritonclient.grpc.service_pb2.ServerLiveResponse.FromString(ours).live
