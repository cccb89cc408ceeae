"""The registry of ensembling modes: what each runs, how it uses the cores, how it is described.

The service's API enums, its docs and the benchmarks' configurations are all read from MODES.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ensemble_contract.manifest import FileEntry, Manifest


class Mode(StrEnum):
    """How one inference runs the ensemble."""

    FUSED = "fused"
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    FUSED_INT8 = "fused-int8"


COMPARE = "compare"
AUTO = "auto"
ModeChoice = StrEnum(  # type: ignore[misc]
    "ModeChoice", {m.name: m.value for m in Mode} | {"COMPARE": COMPARE, "AUTO": AUTO}
)
ModeChoice.__doc__ = (
    "A mode; `compare` to rotate over the modes served so that traffic splits evenly; `auto` for the mode measured "
    "fastest on this machine at start-up (DEFAULT_MODE=auto)."
)


class Runs(StrEnum):
    GRAPH = "graph"  # one session on a fused graph
    MEMBERS = "members"  # one session per member, outputs combined by ensemble_contract.combine


class ThreadPolicy(StrEnum):
    ALL_CORES = "all cores"  # each session's intra-op pool spans the cores
    CORES_SHARED_BY_MEMBERS = "cores // members"  # members run at once, each on its share


@dataclass(frozen=True)
class ModeSpec:
    mode: Mode
    runs: Runs
    concurrent_members: bool
    threads: ThreadPolicy
    description: str

    def graph_file(self, manifest: Manifest) -> FileEntry | None:
        """The graph a GRAPH mode runs (None: not in this directory)."""
        return {Mode.FUSED: manifest.ensemble, Mode.FUSED_INT8: manifest.int8.file}.get(self.mode)


MODES: dict[Mode, ModeSpec] = {
    spec.mode: spec
    for spec in (
        ModeSpec(Mode.FUSED, Runs.GRAPH, False, ThreadPolicy.ALL_CORES, "one session on the fused graph"),
        ModeSpec(
            Mode.SEQUENTIAL, Runs.MEMBERS, False, ThreadPolicy.ALL_CORES, "the members' sessions one after another"
        ),
        ModeSpec(
            Mode.PARALLEL,
            Runs.MEMBERS,
            True,
            ThreadPolicy.CORES_SHARED_BY_MEMBERS,
            "the members' sessions at the same time, the cores split between them",
        ),
        ModeSpec(
            Mode.FUSED_INT8,
            Runs.GRAPH,
            False,
            ThreadPolicy.ALL_CORES,
            "one session on the fused graph quantised to int8 (when the directory has it)",
        ),
    )
}


def served_modes(manifest: Manifest) -> tuple[Mode, ...]:
    """Every mode whose graph the directory holds (fused-int8 only with the int8 graph)."""
    return tuple(m for m, spec in MODES.items() if spec.runs is Runs.MEMBERS or spec.graph_file(manifest) is not None)


def cores_each(cores: int, sharers: int) -> int:
    """The cores each of `sharers` (inference slots, worker processes) sizes its threads by: an equal share, one
    at least."""
    return max(1, cores // sharers)


def intra_op_threads(mode: Mode, cores: int, members: int, slots: int = 1) -> int:
    """Each session's intra-op threads under the mode's policy when `slots` inferences share `cores` at once:
    slots x threads (x members, for parallel) stays within the cores whenever they are that many, and every
    session has one thread at least."""
    per_slot = cores_each(cores, slots)
    if MODES[mode].threads is ThreadPolicy.CORES_SHARED_BY_MEMBERS:
        return max(1, per_slot // members)
    return per_slot


# The choices that are not modes of their own: each request they take runs one of the modes above.
CHOICE_DESCRIPTIONS: dict[str, str] = {
    COMPARE: "rotate over the modes served",
    AUTO: "the mode (and layout) measured fastest on this machine at start-up, with DEFAULT_MODE=auto",
}


def describe_modes() -> str:
    """One line per mode, for docs and API descriptions."""
    lines = [f"{spec.mode}: {spec.description}" for spec in MODES.values()]
    return "; ".join([*lines, *(f"{choice}: {text}" for choice, text in CHOICE_DESCRIPTIONS.items())])
