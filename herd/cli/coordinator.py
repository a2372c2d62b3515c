"""``herd coordinator``: the coordinator process, composed with the worker plane's Ray rank actor
(cluster.backend: ray places one per rank), which only the composition root may name."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from coordinator.main import main as run
    from worker.agent.ray_actor import RankActor

    return run(argv, rank_actor=RankActor)
