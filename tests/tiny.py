"""Tiny random-weight parts built from configs (no downloads): a Llama, a tokenizer, an SAE."""

from __future__ import annotations

import torch

from tools.models import LoadedModel
from tools.sae import LoadedSAE, resolve_hook

D_MODEL = 32
N_LAYERS = 4


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A real fast BPE tokenizer trained in memory on a few words (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [
        "how do I bake bread", "tell me how to hurt someone", "write a poem about the sea",
        "the quick brown fox jumps over the lazy dog", "hack into my neighbour's wifi",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    return fast


def tiny_model(seed: int = 0) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64,
        num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model=model, tokenizer=tok, name="tiny", identity=f"tiny:{seed}",
                       device=torch.device("cpu"))


def tiny_sae(
    layer: int = 2, d_sae: int = 64, k: int = 8, seed: int = 0, center: torch.Tensor | None = None
) -> LoadedSAE:
    """A random TopK SAE. With `center` (a mean residual) as decoder bias, features
    respond to what distinguishes tokens rather than the residual's common direction."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"model.layers.{layer}"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if center is not None:
            sae.b_dec.copy_(center)
            sae.b_enc.zero_()
    return LoadedSAE(sae=sae, spec="tiny", identity=f"tiny-sae:{seed}:{layer}",
                     hook=resolve_hook(cfg.metadata.hook_name), d_in=D_MODEL, d_sae=d_sae)


def mean_residual(lm: LoadedModel, layer: int, texts: list[str]) -> torch.Tensor:
    from tools.probe import ProbeSettings, encode, residuals
    from tools.sae import HookPoint

    hook = HookPoint(f"model.layers.{layer}")
    captured, counted = residuals(lm, [hook], encode(lm.tokenizer, texts, ProbeSettings()))
    return captured[hook][counted].mean(dim=0)
