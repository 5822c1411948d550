"""The shipped launch configs, read by accelerate's own launcher the way `accelerate launch
--config_file` reads them (the multi-GPU runs themselves need GPUs; tests/test_distributed.py
runs DeepSpeed on CPU processes and FSDP2 under torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "ds_configs").glob("accelerate_*.yaml"))
assert any("fsdp" in c.name for c in CONFIGS)


def _launch_args(config: Path):
    args = launch_command_parser().parse_args(["--config_file", str(config), "script.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_accelerate_reads_each_config(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAMLs name their JSON files relative to the repository root
    args = _launch_args(config)
    assert args.num_processes == 4 and not args.cpu
    if "zero" in config.name:
        assert args.use_deepspeed
        assert (ROOT / args.deepspeed_config_file).is_file()
    else:
        from accelerate.utils import FullyShardedDataParallelPlugin

        assert args.use_fsdp
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()  # accelerate's checks of every value
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
