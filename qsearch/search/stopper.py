"""The Tune stopper of a study: ends the experiment when the driver lost its lease or the user
pressed Ctrl-C. In its own module because subclassing Tune's ``Stopper`` imports Ray Tune,
which the driver imports only while Ray starts (``driver.import_tune_side``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune import Stopper

if TYPE_CHECKING:
    from qsearch.search.driver import Heartbeat, Interrupt


class LeaseStopper(Stopper):
    """Tune stopper that ends the experiment when the heartbeat lost the lease or the user
    pressed Ctrl-C."""

    def __init__(self, heartbeat: Heartbeat | None, interrupt: Interrupt | None = None):
        self.heartbeat = heartbeat
        self.interrupt = interrupt

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool((self.heartbeat and self.heartbeat.lost)
                    or (self.interrupt and self.interrupt.requested))

    def __getstate__(self) -> dict[str, Any]:
        return {"heartbeat": None, "interrupt": None}  # Tune pickles its config
