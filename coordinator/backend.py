"""Where a job's ranks run (``cluster.backend``), as the scheduler sees it: the workers a job may
use, and how its ranks start and stop. zeroconf is the registry's agents behind a Launcher
(coordinator/launcher.py); ray is coordinator/ray_backend.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from coordinator.domain import FetchProgress, Job, RankLaunch, WorkerRecord

if TYPE_CHECKING:
    from coordinator.placement import Placement
    from coordinator.scheduler import Wait


class Launcher(Protocol):
    def prepare_rank(self, launch: RankLaunch,
                     on_progress: Callable[[FetchProgress], bool]) -> None: ...

    def start_rank(self, launch: RankLaunch) -> None: ...

    def stop_job(self, worker: WorkerRecord, job_id: str, attempt: int = 0) -> None: ...


def unavailable(name: str) -> str:
    """Why a job naming ``cluster.backend: name`` cannot run on this coordinator."""
    return (f"cluster.backend = {name!r} is not available in this "
            + ("coordinator: `pip install 'herd[ray]'` where it runs, then restart it"
               if name == "ray" else "version"))


class Backend(Protocol):
    """Where a job's ranks run (``cluster.backend``): the workers it may use and how its ranks
    start and stop. ``reserve`` runs between placement and launch, under the scheduler's lock,
    so it never blocks: the chosen workers (with the ports this attempt's ranks listen on), or
    Wait while they are not ready yet (it is asked again next tick). None: nothing to reserve.
    ``prepare_rank`` gets a rank's model onto its worker before any rank starts, reporting
    progress (coordinator/launching.py); None: ``start_rank`` gets it itself, unreported."""

    reserve: Callable[[Job, int, Placement, dict[str, WorkerRecord]],
                      dict[str, WorkerRecord] | Wait] | None
    prepare_rank: Callable[[RankLaunch, Callable[[FetchProgress], bool]], None] | None

    def connect(self, job: Job) -> None: ...   # at submit; raises when it cannot be reached

    def workers(self) -> list[WorkerRecord]: ...

    def start_rank(self, launch: RankLaunch) -> None: ...

    def stop_job(self, worker: WorkerRecord, job: Job) -> None: ...  # job: the attempt to stop


class AgentBackend:
    """zeroconf: the registry's verified agents, started and stopped through the Launcher."""

    reserve = None

    def __init__(self, workers: Callable[[], list[WorkerRecord]], launcher: Launcher):
        self.workers, self._launcher = workers, launcher
        # (a launcher that only starts ranks, as test doubles do: the agent then prepares the
        # model inside StartRank, unreported)
        self.prepare_rank = getattr(launcher, "prepare_rank", None)

    def connect(self, job: Job) -> None:
        pass

    def start_rank(self, launch: RankLaunch) -> None:
        self._launcher.start_rank(launch)

    def stop_job(self, worker: WorkerRecord, job: Job) -> None:
        self._launcher.stop_job(worker, job.job_id, job.attempt)

    def stop_attempt(self, worker: WorkerRecord, job_id: str, attempt: int) -> None:
        """A stale rank (coordinator/reconcile.py): that attempt's, or an older one's."""
        self._launcher.stop_job(worker, job_id, attempt)
