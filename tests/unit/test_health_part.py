"""`Health.part`: a part with one dependency of its own (backfill: Binance REST, analytics:
PostgreSQL) reported in one call, as /readyz shows it."""

from __future__ import annotations

from marketd.health import Dependency, Health


def test_a_part_whose_dependency_answers_is_healthy() -> None:
    health = Health()
    health.part("backfill", Dependency.BINANCE_REST, None, ok="rest answering", meanwhile="x")
    part = health.components["backfill"]
    assert (part.started, part.healthy, part.reason) == (True, True, "rest answering")
    dep = health.dependencies["binance_rest"]
    assert (dep.up, dep.reason) == (True, "answering")


def test_a_part_whose_dependency_is_down_names_the_problem_and_its_consequence() -> None:
    health = Health()
    health.part(
        "analytics",
        Dependency.POSTGRES,
        "postgres unreachable at 127.0.0.1:5432: refused",
        ok="postgres answering",
        meanwhile="analytics endpoints answer 503",
    )
    part = health.components["analytics"]
    assert (part.started, part.healthy) == (True, False)
    assert part.reason == (
        "postgres unreachable at 127.0.0.1:5432: refused; analytics endpoints answer 503"
    )
    dep = health.dependencies["postgres"]
    assert (dep.up, dep.reason) == (False, "postgres unreachable at 127.0.0.1:5432: refused")
