"""Forward passes for CAA steering (tools/tasks/steering.py) on a Llama-style decoder: its
layer list, a hook that adds a vector to a layer's output, capture hooks that read hidden
states at each row's answer position (stopping the pass after the last wanted layer), and a
replay of the decoder from one layer's input on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tools.models import LoadedModel


class StopForward(Exception):
    """Raised by a capture hook once the last wanted layer ran (skips the rest)."""


def decoder_layers(lm: LoadedModel) -> tuple[Any, Any]:
    """(the decoder stack, its list of decoder layers) of a causal LM."""
    decoder = lm.model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"model {lm.name}: its decoder has no `layers` list; steering "
                          "supports Llama-style models (SmolLM2, Llama, Qwen, Mistral)")
    return decoder, layers


def hidden_of(output: Any) -> torch.Tensor:
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return hidden


@contextlib.contextmanager
def steered(lm: LoadedModel, layer: int, delta: np.ndarray | torch.Tensor) -> Iterator[None]:
    """Within the block, decoder layer `layer` of `lm` adds `delta` ([d_model]) to its output
    at every position; the hook is removed on leaving, also after an error."""
    import torch

    _, layers = decoder_layers(lm)
    add = torch.as_tensor(np.asarray(delta) if isinstance(delta, np.ndarray) else delta)

    def hook(module: Any, args: Any, output: Any) -> Any:
        h = hidden_of(output)
        shifted = h + add.to(device=h.device, dtype=h.dtype)
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def n_layers(lm: LoadedModel) -> int:
    return len(decoder_layers(lm)[1])


def length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped into batches of `size`, by length (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + size] for i in range(0, len(order), size)]


def pad_right(seqs: Sequence[Sequence[int]], lm: LoadedModel) -> torch.Tensor:
    """[b, T] token ids, right-padded. No attention mask is needed: the model is causal, so a
    real token never sees the padding after it, and only real positions are read."""
    import torch

    pad = lm.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids.to(lm.device)


class Gather:
    """Where a padded batch is read: each row's position, and the two answer tokens there."""

    def __init__(self, ids: torch.Tensor, last: Sequence[int], yes: Sequence[int] = (),
                 no: Sequence[int] = ()) -> None:
        import torch

        self.rows = torch.arange(len(last), device=ids.device)
        self.last = torch.tensor(list(last), device=ids.device)
        self.yes = torch.tensor(list(yes), dtype=torch.long, device=ids.device)
        self.no = torch.tensor(list(no), dtype=torch.long, device=ids.device)

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, d] each row's hidden state at its position."""
        return hidden[self.rows, self.last]

    def answer(self, head: Any, hidden: torch.Tensor) -> np.ndarray:
        """[b] logit(matching) - logit(not matching) from final hidden states [b, T, d]."""
        logits = head(self.states(hidden))
        margin = logits[self.rows, self.yes] - logits[self.rows, self.no]
        return np.asarray(margin.float().cpu().numpy(), dtype=np.float64)


def capture(sink: list[np.ndarray], at: Gather, stop: bool) -> Any:
    """A forward hook that appends the layer's output at `at`'s positions to `sink`."""

    def hook(module: Any, args: Any, output: Any) -> None:
        sink.append(at.states(hidden_of(output)).float().cpu().numpy())
        if stop:
            raise StopForward

    return hook


def keep_input(sink: dict[int, Any], layer: int) -> Any:
    """A forward pre-hook that keeps the layer's input hidden states in `sink[layer]`."""

    def pre(module: Any, args: Any, kwargs: Any) -> None:
        sink[layer] = args[0] if args else kwargs["hidden_states"]

    return pre


def run_from_layer(decoder: Any, blocks: Any, layer: int,
                   hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states, running only layers `layer`.. on `hidden` (the
    input to `layer`): the decoder's own forward, with its layer list cut for the call."""
    import torch

    decoder.layers = torch.nn.ModuleList(list(blocks)[layer:])
    try:
        out = decoder(inputs_embeds=hidden, use_cache=False).last_hidden_state
        return out  # type: ignore[no-any-return]
    finally:
        decoder.layers = blocks
