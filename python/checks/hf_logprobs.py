"""Per-token log-probs of token sequences under a Hugging Face model folder, optionally with a PEFT
adapter, as transformers and PEFT compute them: the reference side of the Rust tests that check
optimsyn writes models and adapters that the Python stack loads.

Usage: python hf_logprobs.py MODEL_DIR SEQS_JSON [ADAPTER_DIR]
SEQS_JSON holds {"sequences": [[id, ...], ...]}. Prints {"logprobs": [[...], ...]} where
logprobs[i][j] = log p(seq_i[j+1] | seq_i[..=j]) in float32.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

model_dir, seqs_path = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 else None
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
out = []
with torch.no_grad():
    for s in json.load(open(seqs_path))["sequences"]:
        ids = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(lp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
print(json.dumps({"logprobs": out}))
