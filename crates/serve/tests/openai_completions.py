"""Drives `optimsyn serve --enable-lora` with the official `openai` package: `/v1/completions` with
token-id and text prompts, and vLLM's runtime LoRA endpoints through the client's raw `post`, as a
trainer publishing adapters would. Run by the Rust integration test `openai_python` as:
python openai_completions.py BASE_URL MODEL IDS_JSON ADAPTER_DIR. Prints one JSON object."""
import json
import sys

from openai import APIStatusError, BadRequestError, NotFoundError, OpenAI

base_url, model, ids, adapter_dir = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
out = {}


def choices(r):
    return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
             "tokens": c.logprobs.tokens, "token_logprobs": c.logprobs.token_logprobs} for c in r.choices]


r = client.completions.create(model=model, prompt=ids, n=3, max_tokens=8, temperature=0.8, seed=7,
                              logprobs=0, extra_body={"return_tokens_as_token_ids": True})
out["sampled"] = choices(r)
out["usage"] = r.usage.model_dump(exclude_none=True)

r = client.completions.create(model=model, prompt=["hi 1", "hi 2"], n=2, max_tokens=4, temperature=0,
                              logprobs=0)
out["text_prompts"] = choices(r)


def post(path, body):
    """vLLM's LoRA endpoints answer plain text: the client's raw `post` with `cast_to=str`."""
    try:
        return {"status": 200, "text": client.post(path, body=body, cast_to=str)}
    except APIStatusError as e:
        return {"status": e.status_code, "text": e.response.text}


out["load"] = post("/load_lora_adapter", {"lora_name": "ad", "lora_path": adapter_dir})
out["models"] = [{"id": m.id, "parent": (m.model_extra or {}).get("parent")} for m in client.models.list()]
r = client.completions.create(model="ad", prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                              extra_body={"return_tokens_as_token_ids": True})
out["adapter"] = choices(r)
r = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                              extra_body={"return_tokens_as_token_ids": True})
out["base"] = choices(r)
out["unload"] = post("/unload_lora_adapter", {"lora_name": "ad"})
out["unload_again"] = post("/unload_lora_adapter", {"lora_name": "ad"})

try:
    client.completions.create(model="ad", prompt=ids, max_tokens=2)
    out["after_unload"] = None
except NotFoundError as e:
    out["after_unload"] = e.status_code
try:
    client.completions.create(model=model, prompt=ids, max_tokens=2, logprobs=3)
    out["bad_logprobs"] = None
except BadRequestError as e:
    out["bad_logprobs"] = e.status_code
print(json.dumps(out))
