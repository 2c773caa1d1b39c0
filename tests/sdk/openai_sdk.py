"""Drives the gateway with the official OpenAI Python SDK, changing only base_url and api_key.

Usage: openai_sdk.py BASE_URL API_KEY  — prints one JSON object of observations.
"""
import json
import sys

import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
msgs = [{"role": "user", "content": "hello sdk"}]
out = {}

r = client.chat.completions.create(model="gpt-test", messages=msgs, seed=3, user="u")
out["chat"] = r.choices[0].message.content
out["chat_usage"] = r.usage.total_tokens

chunks = list(client.chat.completions.create(model="gpt-test", messages=msgs, stream=True))
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_usage_chunks"] = sum(1 for c in chunks if c.usage is not None)

chunks = list(
    client.chat.completions.create(
        model="gpt-test", messages=msgs, stream=True, stream_options={"include_usage": True}
    )
)
out["stream_usage"] = [c.usage.total_tokens for c in chunks if c.usage is not None]

out["models"] = sorted(m.id for m in client.models.list())
out["model"] = client.models.retrieve("gpt-test").id
emb = client.embeddings.create(model="gpt-test", input=["a b", "c"])
out["embeddings"] = len(emb.data)
comp = client.completions.create(model="gpt-test", prompt="complete me")
out["completion"] = comp.choices[0].text

errors = {}
def expect(name, exc, fn):
    try:
        fn()
        errors[name] = "no error"
    except exc as e:
        errors[name] = e.status_code
    except Exception as e:  # the wrong exception class is a failure too
        errors[name] = f"{type(e).__name__}: {e}"

bad = OpenAI(base_url=base, api_key="fk-wrong", max_retries=0)
expect("auth", openai.AuthenticationError, lambda: bad.models.list())
expect("not_found", openai.NotFoundError,
       lambda: client.chat.completions.create(model="nope", messages=msgs))
expect("forbidden", openai.PermissionDeniedError,
       lambda: client.chat.completions.create(model="secret-model", messages=msgs))
expect("bad_request", openai.BadRequestError,
       lambda: client.chat.completions.create(model="gpt-test", messages=[]))
expect("rate_limited", openai.RateLimitError,
       lambda: client.chat.completions.create(model="fail-429", messages=msgs))
expect("server_error", openai.InternalServerError,
       lambda: client.chat.completions.create(model="fail-500", messages=msgs))
out["errors"] = errors
print(json.dumps(out))
