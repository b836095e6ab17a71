"""Sparse autoencoders: load any sae-lens SAE and resolve where it reads the model.

An SAE spec is one of: a folder shipped with facsynth (`sae_weights/<name>`, relative to
this package), a local sae-lens folder (cfg.json + sae_weights.safetensors), or
`release/sae_id` from sae-lens's pretrained registry (hub; real users only).
Training lives in `tools/sae_train.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tools.errors import SAEError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class HookPoint:
    """A module of the HF model whose output (or input) is the SAE's input."""

    module: str
    side: Literal["output", "input"] = "output"

    @property
    def layer(self) -> int:
        match = re.search(r"layers\.(\d+)$", self.module)
        if not match:
            raise SAEError(f"hook {self.module!r} is not a decoder layer")
        n = int(match.group(1))
        return n - 1 if self.side == "input" else n


def resolve_hook(hook_name: str) -> HookPoint:
    """Map an SAE's `hook_name` to a module of a transformers causal LM.

    Our SAEs name the module directly (`model.layers.15` = that block's output);
    TransformerLens-style names (`blocks.15.hook_resid_post` / `_pre`) are translated.
    """
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook_name)
    if m:
        side: Literal["output", "input"] = "output" if m.group(2) == "post" else "input"
        return HookPoint(f"model.layers.{m.group(1)}", side)
    return HookPoint(hook_name, "output")


@dataclass
class LoadedSAE:
    sae: Any  # sae_lens.SAE
    spec: str
    identity: str
    hook: HookPoint
    d_in: int
    d_sae: int

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_in] residuals -> [n, d_sae] feature activations (fp32)."""
        acts: torch.Tensor = self.sae.encode(x.to(self.sae.W_enc.dtype))
        return acts.float()


def _fingerprint(folder: Path) -> str:
    """Cheap identity of SAE weights: config + size + first MiB of the weights."""
    digest = hashlib.sha256((folder / "cfg.json").read_bytes())
    weights = folder / "sae_weights.safetensors"
    digest.update(str(weights.stat().st_size).encode())
    with weights.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def resolve_sae_folder(spec: str) -> Path | None:
    """A local folder for a shipped or local spec; None for a registry spec."""
    for candidate in (PACKAGE_DIR / spec, Path(spec)):
        if (candidate / "cfg.json").exists():
            return candidate.resolve()
    if Path(spec).exists():
        raise SAEError(f"{spec} has no cfg.json: not an sae-lens SAE folder")
    return None


def load_sae(spec: str, *, device: torch.device | str = "cpu") -> LoadedSAE:
    """Load an SAE by spec (see module doc) onto `device` in fp32."""
    from sae_lens import SAE  # ~6 s import: keep it out of module import time

    folder = resolve_sae_folder(spec)
    try:
        if folder is not None:
            sae = SAE.load_from_disk(folder, device=str(device), dtype="float32")
            identity = f"{folder.name}:{_fingerprint(folder)}"
        else:
            if "/" not in spec:
                raise SAEError(
                    f"unknown SAE {spec!r}: give a folder with cfg.json or release/sae_id"
                )
            release, sae_id = spec.split("/", 1)
            sae = SAE.from_pretrained(release, sae_id, device=str(device), dtype="float32")
            identity = spec
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise SAEError(f"cannot load SAE {spec!r}: {e}") from e
    sae.eval()
    hook_name = sae.cfg.metadata.hook_name
    if not hook_name:
        raise SAEError(f"SAE {spec!r} has no metadata.hook_name: cannot tell which layer it reads")
    return LoadedSAE(
        sae=sae,
        spec=spec,
        identity=identity,
        hook=resolve_hook(hook_name),
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
    )


def check_fits(sae: LoadedSAE, model: Any) -> None:
    """Raise SAEError unless the SAE's hook exists in `model` with the right width."""
    try:
        model.get_submodule(sae.hook.module)
    except AttributeError as e:
        raise SAEError(
            f"SAE {sae.spec!r} reads {sae.hook.module!r}, which this model does not have"
        ) from e
    hidden = getattr(model.config, "hidden_size", None)
    if hidden is not None and hidden != sae.d_in:
        raise SAEError(
            f"SAE {sae.spec!r} expects d_in={sae.d_in} but the model's hidden size is {hidden}"
        )
