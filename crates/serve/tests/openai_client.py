"""Drives `optimsyn serve` with the official `openai` package; run by the Rust integration test
`openai_python` as: python openai_client.py BASE_URL MODEL MESSAGES_JSON. Prints one JSON object.
Every request goes to BASE_URL (a loopback address) with retries off and a timeout."""
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from openai import NotFoundError, OpenAI

base_url, model, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
out = {"models": [m.id for m in client.models.list()]}

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
out["greedy"] = r.choices[0].message.content
out["finish_reason"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump(exclude_none=True)

parts, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump(exclude_none=True)
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["stream"] = "".join(parts)
out["stream_finish"] = finish
out["stream_usage"] = usage


def one(i):
    rr = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"hi {i}"}], temperature=0, max_tokens=8,
    )
    return rr.choices[0].message.content


with ThreadPoolExecutor(8) as pool:
    out["concurrent"] = list(pool.map(one, range(8)))

# A malformed body, sent without the client (which would not send one); no proxy.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
req = urllib.request.Request(
    base_url + "/chat/completions", data=b"{not json", method="POST",
    headers={"Content-Type": "application/json"},
)
try:
    opener.open(req, timeout=30)
    out["malformed_status"] = 200
except urllib.error.HTTPError as e:
    out["malformed_status"] = e.code
    out["malformed_error"] = json.loads(e.read())["error"]

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    out["not_found"] = None
except NotFoundError as e:
    out["not_found"] = e.status_code

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
out["after"] = r.choices[0].message.content
print(json.dumps(out))
