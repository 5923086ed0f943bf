"""The ceiling bench's rounds: each point is its median round, whole, with every round beside it."""

from __future__ import annotations

from flotilla.bench.ceiling import median_round, readme_lines, summary


def test_a_point_is_its_median_round_with_every_rounds_cpu_beside_it() -> None:
    rounds = [
        {"tier": "router", "cpu_us_per_image": 300.0, "requests_per_s": 1.0},
        {"tier": "router", "cpu_us_per_image": 240.0, "requests_per_s": 2.0},
        {"tier": "router", "cpu_us_per_image": 260.0, "requests_per_s": 3.0},
    ]

    point = median_round(rounds)

    assert point["cpu_us_per_image"] == 260.0 and point["requests_per_s"] == 3.0, "the whole median round"
    assert point["rounds_cpu_us_per_image"] == [300.0, 240.0, 260.0], "in the order they ran"
    assert median_round(rounds[:2])["cpu_us_per_image"] == 240.0, "of two, the lower"


def test_the_table_shows_each_rounds_cpu_and_says_how_many_rounds() -> None:
    point = {
        "tier": "router", "api": "unary", "images_per_request": 1, "concurrency": 256, "requests_per_s": 4000.0,
        "cpu_us_per_request": 250.0, "cpu_us_per_image": 250.0, "cores_busy": 1.0, "load_generator_cores_busy": 0.8,
        "ceiling_requests_per_s_one_core": 4000, "rounds_cpu_us_per_image": [260.0, 250.0, 240.0],
    }

    lines = readme_lines({"measured_at": "now", "rounds": 3, "points": [point]})

    assert "in 3 rounds in turn" in lines[0]
    assert any("250.0 (260.0, 250.0, 240.0)" in line for line in lines)


def test_the_targets_ratios_are_the_median_of_each_rounds_own_ratio() -> None:
    def point(tier: str, api: str, rounds: list[float]) -> dict[str, object]:
        return {**median_round([{"tier": tier, "api": api, "images_per_request": 1, "cpu_us_per_image": r,
                                 "cpu_us_per_request": r, "ceiling_requests_per_s_one_core": round(1e6 / r)}
                                for r in rounds])}

    # A slow spell in round 2 moves both sides; its ratio is like the others'.
    unary = point("router", "unary", [240.0, 480.0, 250.0])
    stream = point("router", "stream", [80.0, 160.0, 75.0])
    empty = point("empty gRPC server", "unary", [160.0, 320.0, 170.0])

    out = summary({"points": [unary, stream, empty]})

    assert out["router_stream_over_unary_cpu_us_per_image"] == 0.333  # median of 1/3, 1/3, 0.3
    assert out["router_stream_over_unary_requests_per_s"] == 3.0
    assert out["router_unary_over_empty_grpc_server_cpu_us"] == 1.5  # median of 1.5, 1.5, 1.47


def test_the_unary_call_splits_into_taking_it_relaying_it_and_the_routers_own_work() -> None:
    def point(tier: str, rounds: list[float]) -> dict[str, object]:
        return median_round([{"tier": tier, "api": "unary", "images_per_request": 1, "cpu_us_per_image": r,
                              "cpu_us_per_request": r, "ceiling_requests_per_s_one_core": round(1e6 / r)}
                             for r in rounds])

    out = summary({"points": [point("router", [240.0, 480.0]), point("empty gRPC server", [160.0, 320.0]),
                              point("relay proxy", [200.0, 400.0])]})

    assert out["relay_proxy_alone_cpu_us_per_request"] == 200.0
    assert out["relay_proxy_over_empty_grpc_server_cpu_us"] == 1.25
    assert out["router_unary_over_relay_proxy_cpu_us"] == 1.2
    assert out["router_unary_over_empty_grpc_server_cpu_us"] == 1.5


def test_the_unpaced_unary_point_has_keys_of_its_own_and_its_ratio_to_the_empty_server() -> None:
    def point(tier: str, rounds: list[float], cpm: float, **extra: object) -> dict[str, object]:
        return median_round([{"tier": tier, "api": "unary", "images_per_request": 1, "cpu_us_per_image": r,
                              "cpu_us_per_request": r, "ceiling_requests_per_s_one_core": round(1e6 / r),
                              "calls_per_relay_message": cpm, "concurrency": 256, "requests_per_s": 1e6 / r,
                              "cores_busy": 1.0, "load_generator_cores_busy": 0.8, **extra} for r in rounds])

    unary = point("router", [200.0, 384.0], 6.1)
    unpaced = point("router", [240.0, 480.0], 1.8, pacing_ms=0.0)
    out = summary({"points": [unary, unpaced, point("empty gRPC server", [160.0, 320.0], 0.0)]})

    assert out["router_alone_cpu_us_per_request"] == 200.0, "the default (paced) point keeps its keys"
    assert out["router_alone_unpaced_cpu_us_per_request"] == 240.0
    assert out["router_unary_over_empty_grpc_server_cpu_us"] == 1.23  # median of 1.25 and 1.2, to 2 places
    assert out["router_unary_unpaced_over_empty_grpc_server_cpu_us"] == 1.5
    assert (out["router_unary_pacing_ms"], out["router_unary_calls_per_relay_message"]) == (2.0, 6.1)
    assert out["router_unary_unpaced_calls_per_relay_message"] == 1.8
    assert any("unary (1), router.pacing_ms 0 |" in line for line in readme_lines({"measured_at": "now", "points": [unpaced]}))
