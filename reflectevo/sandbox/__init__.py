"""The code sandbox: model-written programs run in a separate, contained process."""

from reflectevo.sandbox.host import MODES, CodeJob, ExecutionResult, IsolationReport, Sandbox, isolation_report

__all__ = ["MODES", "CodeJob", "ExecutionResult", "IsolationReport", "Sandbox", "isolation_report"]
