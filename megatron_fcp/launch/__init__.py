"""Cluster launch: YAML run configs (:mod:`.spec`), the command lines they resolve to (:mod:`.command`), and
``python -m megatron_fcp.launch print|check|env CONFIG``. Imports neither torch nor megatron-core."""

from megatron_fcp.launch.command import entry_args, entry_module, launcher_env, node_commands
from megatron_fcp.launch.spec import ConfigError, RunSpec, load_run_config

__all__ = ["ConfigError", "RunSpec", "entry_args", "entry_module", "launcher_env", "load_run_config", "node_commands"]
