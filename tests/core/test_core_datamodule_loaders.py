"""The callback's ``val_datamodules`` are prepared as a Trainer prepares a datamodule: ``prepare_data`` once per node (or once in all), then a barrier, then ``setup`` everywhere."""

from __future__ import annotations

import pytest

from lightning_ties.core.inputs import datamodule_loaders


class RecordingDataModule:
    def __init__(self, log: list, name: str, per_node: bool = True) -> None:
        self.log, self.name, self.prepare_data_per_node = log, name, per_node

    def prepare_data(self) -> None:
        self.log.append(("prepare", self.name))

    def setup(self, stage: str) -> None:
        self.log.append(("setup", self.name, stage))

    def val_dataloader(self) -> str:
        return f"loader-{self.name}"


@pytest.mark.parametrize(
    ("local_rank", "global_rank", "prepared"),
    [(0, 0, ["node", "once"]), (0, 2, ["node"]), (1, 1, []), (1, 3, [])],
)
def test_prepare_data_runs_once_per_node_or_once_in_all_before_a_barrier(local_rank, global_rank, prepared) -> None:
    log: list = []
    dms = {"node": RecordingDataModule(log, "node"), "once": RecordingDataModule(log, "once", per_node=False)}
    loaders = datamodule_loaders(dms, local_rank, global_rank, barrier=lambda name: log.append(("barrier",)))
    assert loaders == {"node": "loader-node", "once": "loader-once"}
    # every prepare before the one barrier, every setup after it, on every rank
    assert log == [*(("prepare", n) for n in prepared), ("barrier",), ("setup", "node", "validate"), ("setup", "once", "validate")]


def test_one_process_prepares_everything_without_a_barrier() -> None:
    log: list = []
    assert datamodule_loaders({"a": RecordingDataModule(log, "a", per_node=False)}) == {"a": "loader-a"}
    assert log == [("prepare", "a"), ("setup", "a", "validate")]
