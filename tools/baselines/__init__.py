"""Baseline synthesizers for the toxicity experiment: the same budget and output as the
targeted generator (tools.generate), without aiming at features.

- `random`: plain prompting for a message with the target label, varied only by seed.
- `self-instruct` (Wang et al., 2022; Alpaca-style, one text per request): each request
  shows a few examples drawn from a pool that starts as the seed texts and grows with
  accepted generations (by default 4 seeds + 2 generated, seeds fill in while fewer have
  been generated); a text joins the pool only if its ROUGE-L F against every pool text is
  below 0.7 (computed here by LCS with rouge-score's tokenisation, no stemmer, as the
  paper used it; rouge-score is not a dependency).
- `evol-instruct` (WizardLM, Xu et al., 2023): seed texts are evolved by an operation drawn
  uniformly from four in-depth ones (add a constraint, deepen, concretize, ask for more
  reasoning steps) and one in-breadth one (a new, rarer message in the same domain).
  Failed evolutions (empty, leaking the rewriting instruction, identical to the parent, a
  refusal) are dropped and their parent goes back to be evolved again; successful children
  are output and are the parents of the next generation, until the budget is met (with
  at least `budget` seeds, every sample is a first-generation evolution).
- `magpie` (Xu et al., 2024): an aligned model completes its own chat template's pre-query
  prefix (e.g. `<|im_start|>user\\n` for ChatML); the completion up to the end-of-turn
  marker is a user query. Needs a completion client (`AsyncCompleteClient`) and the prefix
  (`magpie_prefix(tokenizer)`). A completion with no marker is kept whole (a server that
  stops on the marker drops it), so set `max_tokens` high enough not to cut queries.

The paper's four further baselines, one module each (its docstring gives the recipe and
every choice made for it):

- `cot-self-instruct` (Yu et al., 2025; `cot`): reason step by step over two seed texts
  (what makes them what they are), plan, then write one new text after a marker; only the
  text after it is kept. Its RIP filter is, here, the label gate compare applies to every
  baseline's rows (`Comparison.gate`).
- `sao` (Yin et al., 2025; `sao`): fully self-synthetic: messages in the voice of personas
  (prompts/sao_personas.v1.md); for the reward task two sampled replies the model ranks
  itself, the winner chosen.
- `prismatic` (Jung et al., 2025; `prismatic`): k-means over gradient embeddings of a
  logistic proxy head (tools/diversity.py, G-Vendi's space); prompts show rows of sparse
  clusters and keep only replies that land in a sparse cluster. Needs `features`.
- `synalign` (Ren et al., 2025; `synalign`): a GP uncertainty tracker draws the seed unlike
  those drawn so far, the LLM summarises its attributes (topic, intent, style), and the new
  text is written from that summary. Needs `features`. Its distribution alignment is
  `tools.diversity.mmd_weights`, applied by the caller as row weights.

Labels: every chat-prompted method asks for texts with `settings.label` (1 by default: the
experiment adds positives to a toxicity detector's training set) and carries it.
Magpie texts are unlabelled (label None) unless a `labeler` (texts -> labels) is given. A
labeler, when given, labels every method's texts, so the experiment can label all methods
with one and the same rule.

Every method returns exactly `budget` samples: texts that are empty, exact duplicates of a
seed or of an earlier sample, or refusals ("sorry", "as an AI", ...) are rejected and
requested again, at most `budget * max_requests_factor` requests in all; `BaselineError` if
that is not enough, or when the LLM still fails transiently after the retries
(`tools.generate.with_backoff`). A method may reject a reply for a reason of its own
(`RejectedReply`: no marker, a dense cluster, no summary ...), counted the same way. At most
`concurrency` requests are in flight. Provenance: feature -1 (no target feature),
prompt_version "baseline-<method>.<version>" (v3 for the first four methods, v1 for the
paper's four: `version(method)`).

Layout: `base` (names, settings, the error, the completion-client and strategy
interfaces), `rouge` (ROUGE-L without rouge-score), `methods` (random, self-instruct,
evol-instruct), `magpie` (pre-query templates, query cutting), `cot`, `sao`, `prismatic`,
`synalign`, `driver` (the request loop, `synthesize`), `pairs` (pair-task versions).
"""

from tools.baselines.base import (
    DEFAULT_END_MARKERS,
    EVOL_DEPTH_OPS,
    EVOL_OPS,
    METHODS,
    NEEDS_FEATURES,
    NO_FEATURE,
    AsyncCompleteClient,
    BaselineError,
    BaselineSettings,
    Features,
    Labeler,
    Method,
    RejectedReply,
    version,
)
from tools.baselines.driver import asynthesize, synthesize
from tools.baselines.magpie import cut_query, magpie_end_markers, magpie_prefix
from tools.baselines.rouge import RougePool, rouge_l, rouge_tokens

__all__ = [
    "DEFAULT_END_MARKERS",
    "EVOL_DEPTH_OPS",
    "EVOL_OPS",
    "METHODS",
    "NEEDS_FEATURES",
    "NO_FEATURE",
    "AsyncCompleteClient",
    "BaselineError",
    "BaselineSettings",
    "Features",
    "Labeler",
    "Method",
    "RejectedReply",
    "RougePool",
    "asynthesize",
    "cut_query",
    "magpie_end_markers",
    "magpie_prefix",
    "rouge_l",
    "rouge_tokens",
    "synthesize",
    "version",
]
