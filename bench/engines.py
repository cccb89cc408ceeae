"""Ways to run a model directory's ensemble in this process, by name: the configurations the sweep compares.

Every runner takes the same inputs (by name) and combines the members with ensemble_contract.combine, as the
fused graph does, so the configurations differ only in how ONNX Runtime is asked to do the work:

    separate-*   one session per member, run one after another
    parallel     one session per member, run at the same time in threads, the cores split between them
    fused-*      one session on ensemble.onnx
    alone:<i>    member i by itself (for "the sum of the members alone")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ensemble_contract.combine import combine
from ensemble_contract.manifest import load_manifest

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], object]
ALONE_PREFIX = "alone:"
ORT_ERRORS_ONLY = 3


class Layout(StrEnum):
    SEPARATE = "separate"
    PARALLEL = "parallel"
    FUSED = "fused"


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options; None keeps ONNX Runtime's default."""

    allow_spinning: bool | None = None
    intra_op_threads: int | None = None
    global_pool: bool = False  # one process-wide intra-op pool shared by every session

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = ORT_ERRORS_ONLY
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.allow_spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.global_pool:
            options.use_per_session_threads = False
        return options

    def describe(self) -> str:
        if self == SessionConfig():
            return "default SessionOptions"
        parts = []
        if self.intra_op_threads is not None:
            parts.append(f"intra_op_num_threads={self.intra_op_threads}")
        if self.allow_spinning is not None:
            parts.append(f"allow_spinning={int(self.allow_spinning)}")
        if self.global_pool:
            parts.append("global thread pool")
        return ", ".join(parts)


@dataclass(frozen=True)
class RunConfig:
    name: str
    layout: Layout
    session: SessionConfig = field(default_factory=SessionConfig)
    member: int | None = None  # only this member, alone
    summary: str = ""


CONFIGS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        RunConfig("separate-default", Layout.SEPARATE, summary="separate sessions in a loop, default options"),
        RunConfig(
            "separate-nospin",
            Layout.SEPARATE,
            SessionConfig(allow_spinning=False),
            summary="separate sessions in a loop, spinning off",
        ),
        RunConfig(
            "separate-globalpool",
            Layout.SEPARATE,
            SessionConfig(global_pool=True),
            summary="separate sessions in a loop sharing one global thread pool",
        ),
        RunConfig(
            "parallel",
            Layout.PARALLEL,
            SessionConfig(allow_spinning=False),
            summary="separate sessions at the same time in threads, cores // members intra-op threads each",
        ),
        RunConfig("fused-default", Layout.FUSED, summary="one session on the fused graph, default options"),
        RunConfig(
            "fused-nospin", Layout.FUSED, SessionConfig(allow_spinning=False), summary="fused graph, spinning off"
        ),
    )
}


def alone(member: int) -> RunConfig:
    return RunConfig(f"{ALONE_PREFIX}{member}", Layout.SEPARATE, member=member, summary=f"member {member} alone")


def config_named(name: str) -> RunConfig:
    if name.startswith(ALONE_PREFIX):
        return alone(int(name.removeprefix(ALONE_PREFIX)))
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)} and alone:<i>") from None


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _session(path: Path, session: SessionConfig) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session.options(), providers=["CPUExecutionProvider"])


def open_runner(model_dir: Path, config: RunConfig, fused_file: Path | None = None) -> Runner:
    """A runner for `config` over the model directory; `fused_file` replaces ensemble.onnx (e.g. an int8 one)."""
    manifest = load_manifest(model_dir, verify_files=False)
    if config.session.global_pool:
        ort.set_global_thread_pool_sizes(_cores(), 1)  # must precede the first session of the process
    if config.layout is Layout.FUSED:
        fused = _session(fused_file or model_dir / manifest.ensemble.path, config.session)
        return lambda feeds: fused.run(None, feeds)
    members = list(manifest.members) if config.member is None else [manifest.members[config.member]]
    session_config = config.session
    if config.layout is Layout.PARALLEL and session_config.intra_op_threads is None:
        session_config = SessionConfig(session_config.allow_spinning, max(1, _cores() // len(members)))
    sessions = [_session(model_dir / m.file.path, session_config) for m in members]
    names = list(manifest.member_outputs)

    def run(session: ort.InferenceSession, feeds: Feeds) -> Feeds:
        return dict(zip(names, session.run(names, feeds), strict=True))

    weights = manifest.weights if config.member is None else None  # a member alone is not weighed
    if config.layout is Layout.SEPARATE:
        return lambda feeds: combine([run(s, feeds) for s in sessions], manifest.combine, weights)
    pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="member")
    return lambda feeds: combine(list(pool.map(lambda s: run(s, feeds), sessions)), manifest.combine, weights)
