#!/usr/bin/env python3
"""Load client for benches/local_llm.sh: streams greedy chat completions from an OpenAI-compatible
server and reports time to first token and tokens/s; optionally embedding latency.

usage: local_llm.py chat BASE_URL KEY MODEL CONCURRENCY ROUNDS MAX_TOKENS
       local_llm.py embed BASE_URL KEY MODEL N

Tokens are counted as content chunks (both servers send one token per chunk; Fuke merges only
text held back for a stop sequence, and the bench sets none). Prints one JSON line.
"""

import asyncio
import json
import statistics
import sys
import time

import httpx

SYSTEM = "You are a helpful assistant for an online shop. Answer clearly and politely."

PROMPTS = [
    "Explain how a refund is processed after an order is returned.",
    "Describe the water cycle for a ten year old.",
    "Write a short story about a lighthouse keeper.",
    "List some tips for keeping a garden healthy in summer.",
    "Explain why the sky is blue.",
    "Describe a day in the life of a city bus driver.",
    "Give advice to someone learning to cook.",
    "Explain what a database index is.",
]


async def one_stream(client, url, key, model, prompt, max_tokens):
    body = {
        "model": model,
        # An explicit system message: both servers then format the same prompt (SmolLM2's jinja
        # template adds a default system prompt when there is none; llama.cpp's built-in ChatML
        # formatting, which Fuke uses, does not).
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        # llama-cpp-python's server applies repeat_penalty 1.1 unless told otherwise; Fuke
        # applies none (OpenAI has no such parameter) and ignores the field.
        "repeat_penalty": 1.0,
        "max_tokens": max_tokens,
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream(
        "POST", url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "tokens": tokens, "total": end - start,
            "decode_rate": (tokens - 1) / (end - first) if first and tokens > 1 else 0.0}


async def chat(base, key, model, concurrency, rounds, max_tokens):
    url = base + "/chat/completions"
    results = []
    async with httpx.AsyncClient(timeout=600) as client:
        # Warm-up (first request pays lazy initialisation on both servers).
        await one_stream(client, url, key, model, "Hello", 8)
        wall = 0.0
        for r in range(rounds):
            start = time.perf_counter()
            batch = await asyncio.gather(*[
                one_stream(client, url, key, model, PROMPTS[(r * concurrency + i) % len(PROMPTS)],
                           max_tokens)
                for i in range(concurrency)
            ])
            wall += time.perf_counter() - start
            results.extend(batch)
    total_tokens = sum(x["tokens"] for x in results)
    ttfts = sorted(x["ttft"] for x in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / wall,
        "per_stream_decode_tokens_per_s": statistics.median(x["decode_rate"] for x in results),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_max_ms": 1000 * ttfts[-1],
    }


async def embed(base, key, model, n):
    # A 20-word sentence.
    text = ("Where can I find the tracking number for the parcel I ordered last week "
            "from your online shop tell me")
    assert len(text.split()) == 20
    times = []
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n + 5):
            start = time.perf_counter()
            r = await client.post(base + "/embeddings", json={"model": model, "input": text},
                                  headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            if i >= 5:
                times.append(time.perf_counter() - start)
        # Throughput: 64 concurrent single-sentence requests.
        start = time.perf_counter()
        rs = await asyncio.gather(*[
            client.post(base + "/embeddings", json={"model": model, "input": f"{text} {i}"},
                        headers={"Authorization": f"Bearer {key}"})
            for i in range(64)
        ])
        wall = time.perf_counter() - start
        for r in rs:
            r.raise_for_status()
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(len(times) * 0.99) - 1],
            "concurrent64_per_s": 64 / wall}


def main():
    mode, base, key, model = sys.argv[1:5]
    if mode == "chat":
        c, rounds, max_tokens = map(int, sys.argv[5:8])
        out = asyncio.run(chat(base, key, model, c, rounds, max_tokens))
    else:
        out = asyncio.run(embed(base, key, model, int(sys.argv[5])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
