"""Generation throughput of the three LLM backends, measured side by side in one run.

64 generation prompts (generate_toxicity.v3 over 64 themes), exactly 64 new tokens each
(HF: min_new_tokens = max_new_tokens; vLLM: min_tokens + ignore_eos), temperature 0.8:
(a) in-process HF generate, one prompt at a time;
(b) in-process batched (LocalChat.generate_batch, left-padded batches of --batch);
(c) the managed vLLM server (tools.llm_server) at --concurrency requests in flight through
    the same async ChatOpenAI client facsynth uses; server start-up is timed separately.
The HF runs come first, then the server starts, so no two backends share the CPU.

    python bench/generate.py [--n 64] [--tokens 64] [--batch 16] [--concurrency 32]
                             [--vllm-arg=--enforce-eager ...]

Last line: vllm_vs_sequential=<x> batched_vs_sequential=<y> vllm_startup_s=<z>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import torch

from agent.llm import make_chat_model, served_model
from prompts import render
from tools.generate import PROMPT, SYSTEM
from tools.llm_server import ManagedVLLM
from tools.local_llm import LocalChat
from tools.models import load_model
from tools.settings import Settings

OUT = Path(__file__).resolve().parent / "out" / "generate"

THEMES = [
    "stealing a car", "poisoning a neighbour", "hacking a wifi network", "making a fake ID",
    "cheating on an exam", "shoplifting", "phishing emails", "bullying a classmate",
    "breaking into a house", "counterfeit money", "stalking an ex", "tax evasion",
    "insulting someone's religion", "buying drugs online", "writing malware", "arson",
    "faking a doctor's note", "harassing a coworker", "doxxing a streamer", "pirating movies",
    "picking a lock", "evading the police", "making a weapon", "spreading rumours",
    "blackmail", "racist jokes", "self-harm", "animal cruelty", "vandalism", "bribery",
    "identity theft", "credit card fraud", "jailbreaking a chatbot", "cyberbullying",
    "sexual harassment", "election misinformation", "fake product reviews", "plagiarism",
    "poaching", "illegal gambling", "smuggling", "forging a signature", "revenge porn",
    "threatening a teacher", "hate speech", "extremist propaganda", "drunk driving",
    "scamming the elderly", "stealing a password", "cheating at poker", "ransomware",
    "hiding a body", "cooking meth", "swatting", "catfishing", "pyramid schemes",
    "insider trading", "sabotaging a rival", "spying on a partner", "toxic gaming chat",
    "baking bread", "planting tomatoes", "learning the guitar", "writing a cover letter",
]


def prompts(n: int) -> list[tuple[str, str]]:
    return [(SYSTEM, render(PROMPT, summary=THEMES[i % len(THEMES)], spans=[],
                            label=int(i < 60)))
            for i in range(n)]


def run_hf(chat: LocalChat, messages: list[tuple[str, str]], batch: int, tokens: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(messages), batch):
        chat.generate_batch(messages[i : i + batch], temperature=0.8, seed=i,
                            max_new_tokens=tokens, min_new_tokens=tokens)
        if (i + batch) % 16 == 0:
            print(f"    {i + batch}/{len(messages)} prompts, {time.perf_counter() - started:.0f} s",
                  flush=True)
    return time.perf_counter() - started


async def run_vllm(model: object, messages: list[tuple[str, str]], concurrency: int,
                   tokens: int) -> tuple[float, int]:
    from langchain_core.messages import HumanMessage, SystemMessage

    gate = asyncio.Semaphore(concurrency)
    bound = model.bind(  # type: ignore[attr-defined]
        temperature=0.8, max_tokens=tokens, extra_body={"min_tokens": tokens, "ignore_eos": True}
    )

    async def one(i: int, system: str, user: str) -> int:
        async with gate:
            reply = await bound.bind(seed=i).ainvoke([SystemMessage(system), HumanMessage(user)])
        return int(reply.usage_metadata["output_tokens"])

    started = time.perf_counter()
    counts = await asyncio.gather(*[one(i, s, u) for i, (s, u) in enumerate(messages)])
    return time.perf_counter() - started, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description="generation benchmark (see module doc)")
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched HF run")
    ap.add_argument("--concurrency", type=int, default=32, help="vLLM requests in flight")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server flag")
    ap.add_argument("--compiled", action="store_true",
                    help="let vLLM torch.compile the model (default on CPU: --enforce-eager)")
    ap.add_argument("--skip-hf", action="store_true", help="only the vLLM run (for trials)")
    args = ap.parse_args()

    settings = Settings()
    messages = prompts(args.n)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other processes on the machine skew every number)", flush=True)
    rows: list[tuple[str, float, int, float | None]] = []  # name, seconds, tokens, startup
    if not args.skip_hf:
        lm = load_model(settings.model, cache_dir=settings.home)
        chat = LocalChat(lm)
        print(f"HF: {lm.name} on {lm.device}, {torch.get_num_threads()} torch threads",
              flush=True)
        chat.generate_batch(messages[:2], max_new_tokens=4)  # warm-up, not timed
        seconds = run_hf(chat, messages, 1, args.tokens)
        rows.append(("(a) HF one at a time", seconds, args.n * args.tokens, None))
        print(f"  sequential: {seconds:.1f} s", flush=True)
        seconds = run_hf(chat, messages, args.batch, args.tokens)
        rows.append((f"(b) HF batched ({args.batch})", seconds, args.n * args.tokens, None))
        print(f"  batched: {seconds:.1f} s", flush=True)
        del chat, lm

    source, name = served_model(settings)
    run_dir = OUT / time.strftime("%Y%m%d-%H%M%S")
    server = ManagedVLLM(source, run_dir, model_name=name,
                         startup_timeout=settings.vllm_startup_timeout,
                         enforce_eager=False if args.compiled else None,
                         extra_args=args.vllm_arg)
    started = time.perf_counter()
    with server:
        startup = time.perf_counter() - started
        flags = " ".join(server.vllm_command(server.port or 0)[3:])
        print(f"vLLM ready after {startup:.1f} s: {flags}", flush=True)
        served = settings.model_copy(update={"llm_base_url": server.base_url,
                                             "llm_model": server.model_name})
        model = make_chat_model(served)
        asyncio.run(run_vllm(model, messages[:2], 2, 4))  # warm-up, not timed
        seconds, tokens = asyncio.run(run_vllm(model, messages, args.concurrency,
                                               args.tokens))
    rows.append((f"(c) vLLM, {args.concurrency} in flight", seconds, tokens, startup))

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"\n{'backend':<28}{'tokens':>8}{'seconds':>10}{'tok/s':>9}{'start-up s':>12}")
    for label, seconds, tokens, start in rows:
        print(f"{label:<28}{tokens:>8}{seconds:>10.1f}{tokens / seconds:>9.1f}"
              f"{'' if start is None else f'{start:.1f}':>12}")
    rate = {label[:3]: tokens / seconds for label, seconds, tokens, _ in rows}
    base = rate.get("(a)", float("nan"))
    print(f"vllm_vs_sequential={rate['(c)'] / base:.2f} "
          f"batched_vs_sequential={rate.get('(b)', float('nan')) / base:.2f} "
          f"vllm_startup_s={rows[-1][3]:.1f}")


if __name__ == "__main__":
    main()
