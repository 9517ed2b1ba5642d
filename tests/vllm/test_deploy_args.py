"""The compose file's vLLM commands parse with vLLM's own server argument parser."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)  # exits 2 on an unknown flag
    out[name] = {"model": ns.model, "enable_lora": bool(ns.enable_lora), "max_logprobs": ns.max_logprobs}
print(json.dumps(out))
"""


def test_vllm_commands_parse_with_vllms_parser(vllm_python: Path) -> None:
    services = yaml.safe_load((ROOT / "deploy" / "docker-compose.gpu.yml").read_text())["services"]
    argv = {name: services[name]["command"] for name in ("vllm-student", "vllm-teacher")}
    proc = subprocess.run(
        [str(vllm_python), "-c", CHECK, json.dumps(argv)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["vllm-student"]["enable_lora"] and parsed["vllm-student"]["max_logprobs"] == 20
    assert parsed["vllm-teacher"]["model"] == "/models/gemma-3-270m"
