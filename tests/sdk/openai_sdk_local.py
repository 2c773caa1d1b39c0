"""The official OpenAI Python SDK against local models served by the gateway (only base_url and
api_key changed). Usage: openai_sdk_local.py BASE_URL API_KEY CHAT_MODEL EMBED_MODEL — prints one
JSON object of observations.
"""
import base64
import json
import struct
import sys

from openai import OpenAI

base, key, chat_model, embed_model = sys.argv[1:5]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
msgs = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
out = {}

r = client.chat.completions.create(model=chat_model, messages=msgs, temperature=0, max_tokens=16)
out["json_text"] = r.choices[0].message.content
out["json_finish"] = r.choices[0].finish_reason
out["json_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]

chunks = list(
    client.chat.completions.create(
        model=chat_model, messages=msgs, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
)
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_roles"] = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
out["stream_usage"] = [
    [c.usage.prompt_tokens, c.usage.completion_tokens] for c in chunks if c.usage is not None
]

e = client.embeddings.create(model=embed_model, input=["How do I get a refund?", "Hello"])
out["embedding_dims"] = [len(d.embedding) for d in e.data]
# The SDK asks for base64 by default when numpy is present and decodes it; ask explicitly too.
raw = client.embeddings.with_raw_response.create(
    model=embed_model, input="How do I get a refund?", encoding_format="base64"
).http_response.json()
vec = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
out["base64_matches"] = max(abs(a - b) for a, b in zip(vec, e.data[0].embedding)) < 1e-3

print(json.dumps(out))
