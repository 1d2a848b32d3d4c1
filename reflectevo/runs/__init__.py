"""Run directories: manifest, stage identities, the writer lock, provenance."""

from reflectevo.runs.plan import read_manifest
from reflectevo.runs.rundir import RunDir, open_run
from reflectevo.runs.stages import STAGES, get_stage

__all__ = ["STAGES", "RunDir", "get_stage", "open_run", "read_manifest"]
