#!/usr/bin/env python3
"""Makes the bundled assets of `optimsyn demo`: a fictional two-domain corpus, validation sets,
prompt templates, a byte-level BPE tokenizer and three tiny Qwen3 models (target, generator,
policy) in Hugging Face folder format. Deterministic: the same versions on the same kind of CPU
give the same bytes (see MANIFEST.json for the sha256 of every file).

Usage: make_demo.py [OUT_DIR]        (default: crates/optimsyn/demo beside this repository's root)

Design (the method in miniature)
--------------------------------
A policy model writes a *rubric* (JSON, four keys) for a seed document; a generator model turns
(document, rubric) into one QA pair; QA pairs are scored by their influence on a target model's
validation loss; GRPO trains the policy. For this to work at tiny scale the rubric must really
steer which fact the QA asks about:

* Corpus. Two domains, `medicine` (fictional drugs) and `history` (fictional cities), 150
  documents each, generated from name/fact tables with random.Random(0). Every document has an
  intro sentence, five fact sentences of fixed kinds and one or two filler sentences, the facts and
  fillers in shuffled order (two phrasings per fact kind), 36-55 words (45 on average):
    medicine: organ (target organ), dose, year (discovery year), side (side effect), discoverer
    history:  river, founded (year + founder), population, dish (known dish), ruler
  `corpus.jsonl` holds all 300 (the target's pretraining text); `seeds.jsonl` the seed documents
  of the RL loop (per domain docs 0-23: 48 seeds); `facts.jsonl` every document's facts and the
  expected QA for each kind; `kinds.json` the kinds, their rubric phrases and QA surface forms.
* Validation. `val.jsonl` (influence; per domain docs 130-139) and `heldout.jsonl` (final
  evaluation; docs 140-149), disjoint documents, chat rows {"id", "messages": [user, assistant],
  "subtask"} asking about two kinds per domain: med-organ, med-dose, hist-river, hist-founded
  (10 docs x 2 kinds x 2 domains = 40 rows each). The questions and answers have exactly the
  surface form the generator writes.
* Rubric. {"Prompt-related": P, "Response-related": R, "Prompt-Response alignment": A,
  "Technical/trainability aspects": T}. P names one fact kind, "Ask about the <phrase> of the
  <drug|city>." or "Write a question on the <phrase> of the <drug|city>."; R, A and T are short
  phrases drawn from small fixed lists.
* Generator output. One JSON object {"messages": [{"role": "user", "content": Q}, {"role":
  "assistant", "content": A}]}, Q asking about the kind P names, A stating it from the document
  (e.g. Q "Which river flows through Velmora?", A "The Orsk river.").
* Templates (`templates/`, plain variables, no trailing newline, the same text for jinja2 and
  minijinja): policy_system / policy_user (domain, document), qa_system / qa_user (domain,
  document, prompt_related, response_related, alignment, technical).
* Tokenizer. Byte-level BPE (tokenizers), vocab 2048, trained on the corpus and every prompt,
  rubric and QA text; <|endoftext|> 0 (pad), <|im_start|> 1, <|im_end|> 2 (eos); no
  post-processor; the bench model's ChatML template and tokenizer_config conventions.
* Models. Qwen3 (hidden 128, 4 layers, 4 q / 2 kv heads, head_dim 32, MLP 384, 1024 positions,
  tied embeddings), fp32, save_pretrained + tokenizer files + chat_template.jinja +
  generation_config.json (eos 2):
    models/target     random init, pretrained with AdamW on the 300 documents as plain text
                      (tokenizer(text) + eos; 400 steps, batch 16, lr 3e-3, loss ~0.13 as in
                      the miniature): it knows the facts, not the QA format.
    models/generator  the target's weights, then SFT on (qa prompt for a seed document and a rubric
                      naming kind K) -> the JSON QA about K, loss on the assistant turn (content +
                      <|im_end|>): every seed document x kind x prompt form, twice with fresh R/A/T
                      (960 examples, 300 steps, lr 3e-3). It is trained for the seed documents (the
                      only documents the pipeline gives it): greedy output there is right almost
                      always; on unseen documents it keeps the format but not the facts (it recalls
                      more than it copies; a copying generator needs more CPU than the demo allows).
    models/policy     the target's weights, then SFT on (policy prompt for one of docs 0-129) -> a
                      rubric whose P names each of the domain's five kinds equally often per
                      document (2600 examples, 200 steps, lr 4e-3), so that sampling is roughly
                      uniform over kinds and GRPO can move it toward the kinds the validation set
                      asks about. A model this small parses well at T = 1.0 (or T = 1.5 with
                      top_p 0.9); at T = 1.5, top_p 1 its tail mass breaks most JSON.
  Chat examples are rendered with apply_chat_template and encoded once without special tokens.
* Checks recorded in MANIFEST.json: final losses; the generator's greedy parse rate / question /
  answer accuracy on 50 prompts of seed documents (and 40 of unseen validation documents); the
  policy's sampled parse rate and kind distribution on the seed documents at T = 1.0, 1.2, 1.5 and
  1.5 with top_p 0.9, and how often the generator then writes exactly the expected QA for the
  kind each sampled rubric names (the steering the demo relies on).
* Determinism: random.Random(0) for data, torch.manual_seed per model and per sampling run,
  torch.use_deterministic_algorithms(True), torch.set_num_threads(2).
"""
import os

# Threads wait passively: on a shared 2-core machine, spinning OpenMP workers slow training ~5x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib
import json
import math
import platform
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import jinja2
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

T_START = time.time()
REPO = Path(__file__).resolve().parents[2]
SEED = 0

# ----------------------------------------------------------------------------------------------
# Name and fact tables (all fictional)
# ----------------------------------------------------------------------------------------------
DRUG_A = ["Val", "Mor", "Tes", "Quin", "Ar", "Bel", "Cor", "Dex", "Fen", "Hal",
          "Ix", "Lor", "Nev", "Op", "Pra", "Ros", "Sul", "Tor", "Ul", "Zan"]
DRUG_B = ["a", "e", "i", "o", "u", "ri", "lo", "ta", "ne", "vi"]
DRUG_C = ["rex", "dol", "zine", "mab", "tin", "pril", "vast", "cil", "xan", "fen"]
CITY_A = ["Vel", "Ost", "Kar", "Bri", "Dun", "Eld", "Fal", "Gor", "Hel", "Ist",
          "Jor", "Kel", "Lun", "Mar", "Nor", "Ol", "Pel", "Ras", "Sil", "Tam"]
CITY_B = ["a", "e", "o", "i", "u", "an", "er", "ol", "in", "ar"]
CITY_C = ["mora", "grad", "heim", "ford", "wick", "ton", "burg", "vale", "mere", "stad"]
FIRST = ["Ilsa", "Tomas", "Mara", "Oren", "Lina", "Petr", "Anja", "Bram", "Cora", "Davin",
         "Edda", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Leon", "Mila", "Nils"]
LAST = ["Marrow", "Tesk", "Holm", "Vardy", "Quell", "Brask", "Dorn", "Fenwick", "Garrow", "Hale",
        "Ivers", "Lask", "Moll", "Nyberg", "Orm", "Pike", "Rook", "Stavr", "Thorn", "Wex"]
DISEASES = ["Hessel fever", "grey lung", "Marn syndrome", "blue pox", "Tarrow cough",
            "river chill", "Oska palsy", "bone rot", "Velt disease", "night sweat",
            "Corbin rash", "salt sickness", "Dravic flu", "marsh ague", "Lenn fever"]
ORGANS = ["liver", "kidneys", "heart", "lungs", "stomach", "spleen", "pancreas", "skin",
          "bones", "brain", "eyes", "thyroid", "bladder", "gut"]
DOSES = [5, 10, 20, 25, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500]
SIDES = ["nausea", "dizziness", "a dry mouth", "headaches", "a skin rash", "blurred vision",
         "hair loss", "weight gain", "insomnia", "muscle cramps", "hiccups", "ringing ears",
         "cold hands", "a metallic taste"]
MED_FILLERS = ["Doctors still study it.", "It comes as a small white pill.",
               "Many clinics keep it in stock.", "It is sold in glass bottles.",
               "Nurses give it with water.", "It is stored in a cool place."]
RIVERS = ["Orsk", "Vell", "Tamar", "Drev", "Lusk", "Emer", "Sarn", "Kolt", "Ilm", "Ruun",
          "Petta", "Gard", "Osk", "Wend", "Brin", "Harl", "Mose", "Nira", "Celm", "Ysel"]
DISHES = ["smoked eel pie", "honey bread", "lamb stew with plums", "cabbage dumplings",
          "fried river trout", "barley soup", "salted plum cake", "goat cheese tart",
          "pepper sausages", "onion flatbread", "baked carp", "walnut porridge", "mushroom pie",
          "apple fritters", "beet soup", "roast quail", "spiced lentils", "cherry buns",
          "pickled herring", "sweet rice cakes"]
TITLES = ["King", "Queen", "Duke", "Duchess", "Count", "Countess", "Prince", "Princess"]
REGIONS = ["north", "south", "east", "west", "hills", "lowlands", "high valley", "coast plain"]
HIST_FILLERS = ["Its market is busy.", "Traders come in spring.",
                "Its walls are made of grey stone.", "The old bridge still stands.",
                "Its streets are narrow.", "A bell tower rises over the square."]

# Per kind: the rubric phrase, the QA surface form (question, answer).
KINDS = {
    "medicine": {
        "entity": "drug",
        "kinds": {
            "organ": ("target organ", "Which organ does {e} act on?", "The {organ}."),
            "dose": ("dose", "What is the usual dose of {e}?", "{dose} a day."),
            "year": ("discovery year", "When was {e} discovered?", "In {year}."),
            "side": ("side effect", "What is a common side effect of {e}?", "{Side}."),
            "discoverer": ("discoverer", "Who discovered {e}?", "{discoverer}."),
        },
        "prefix": "med",
    },
    "history": {
        "entity": "city",
        "kinds": {
            "river": ("river", "Which river flows through {e}?", "The {river} river."),
            "founded": ("founding", "When was {e} founded, and by whom?", "In {year}, by {founder}."),
            "population": ("population", "How many people live in {e}?", "About {population} people."),
            "dish": ("known dish", "What dish is {e} known for?", "{Dish}."),
            "ruler": ("ruler", "Who rules {e}?", "{ruler}."),
        },
        "prefix": "hist",
    },
}
VAL_KINDS = {"medicine": ["organ", "dose"], "history": ["river", "founded"]}
PROMPT_FORMS = ["Ask about the {phrase} of the {entity}.", "Write a question on the {phrase} of the {entity}."]
RESPONSE_FORMS = ["Give a short answer.", "Answer in a few words.", "Keep the answer brief.",
                  "State only the fact."]
ALIGN_FORMS = ["The answer must match the question.", "The answer states the fact asked for.",
               "Answer exactly what is asked."]
TECH_FORMS = ["Use the exact names and numbers.", "Copy names and numbers exactly.",
              "Keep the wording plain."]
RUBRIC_KEYS = ["Prompt-related", "Response-related", "Prompt-Response alignment",
               "Technical/trainability aspects"]

TARGET_STEPS, TARGET_LR = 400, 3e-3  # batch 16 each
GEN_STEPS, GEN_LR = 300, 3e-3
POL_STEPS, POL_LR = 200, 4e-3
N_DOCS = 150          # per domain
SEEDS = range(0, 24)  # per domain: seed documents of the RL loop (the generator's SFT documents)
GEN_DRAWS = 2  # generator SFT: examples per (seed document, kind, prompt form), R/A/T drawn afresh
TRAIN_DOCS = range(0, 130)  # per domain: documents of the policy's SFT
VAL_DOCS = range(130, 140)
HELDOUT_DOCS = range(140, 150)

# ----------------------------------------------------------------------------------------------
# Templates (written to OUT/templates; no trailing newline so jinja2 and minijinja agree)
# ----------------------------------------------------------------------------------------------
TEMPLATES = {
    "policy_system.jinja": "You write rubrics for {{ domain }} question-answer pairs.",
    "policy_user.jinja": (
        "Domain: {{ domain }}\n"
        "Document: {{ document }}\n"
        "Write a rubric for one question-answer pair on this document: one JSON object with the keys "
        "\"Prompt-related\", \"Response-related\", \"Prompt-Response alignment\" and "
        "\"Technical/trainability aspects\"."),
    "qa_system.jinja": "You write one {{ domain }} question-answer pair as JSON.",
    "qa_user.jinja": (
        "Document: {{ document }}\n"
        "Question: {{ prompt_related }}\n"
        "Answer: {{ response_related }}\n"
        "Alignment: {{ alignment }}\n"
        "Technical: {{ technical }}\n"
        "Reply with {\"messages\": [user turn, assistant turn]}."),
}
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "unk_token": None,
    "model_max_length": 1024,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 2048
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def log(msg):
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------
def names(rng, parts, n):
    out, seen = [], set()
    while len(out) < n:
        s = "".join(rng.choice(p) for p in parts)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def cap(s):
    return s[0].upper() + s[1:]


def make_med_doc(rng, e):
    f = {"organ": rng.choice(ORGANS), "dose": f"{rng.choice(DOSES)} mg", "year": str(rng.randint(1820, 1990)),
         "side": rng.choice(SIDES), "discoverer": person(rng), "disease": rng.choice(DISEASES)}
    f["Side"] = cap(f["side"])
    intro = rng.choice([f"{e} is a drug for {f['disease']}.", f"{e} is a medicine used against {f['disease']}."])
    facts = [
        rng.choice([f"It acts on the {f['organ']}.", f"{e} works on the {f['organ']}."]),
        rng.choice([f"The usual dose is {f['dose']} a day.", f"Patients take {f['dose']} a day."]),
        rng.choice([f"{e} was discovered in {f['year']}.", f"It was first found in {f['year']}."]),
        rng.choice([f"A common side effect is {f['side']}.", f"It can cause {f['side']}."]),
        rng.choice([f"It was discovered by {f['discoverer']}.", f"{f['discoverer']} discovered {e}."]),
    ]
    return intro, facts, rng.sample(MED_FILLERS, rng.randint(1, 2)), f


def make_hist_doc(rng, e):
    y = str(rng.randint(800, 1600))
    f = {"river": rng.choice(RIVERS), "year": y, "founder": person(rng),
         "population": f"{rng.randint(3, 950)},000", "dish": rng.choice(DISHES),
         "ruler": f"{rng.choice(TITLES)} {rng.choice(FIRST)}", "region": rng.choice(REGIONS)}
    f["Dish"] = cap(f["dish"])
    intro = rng.choice([f"{e} is a city in the {f['region']}.", f"{e} is an old city of the {f['region']}."])
    facts = [
        rng.choice([f"The {f['river']} river flows through {e}.", f"{e} lies on the {f['river']} river."]),
        rng.choice([f"{e} was founded in {y} by {f['founder']}.", f"{f['founder']} founded {e} in {y}."]),
        rng.choice([f"About {f['population']} people live there.", f"{e} has about {f['population']} people."]),
        rng.choice([f"The city is known for {f['dish']}.", f"{e} is famous for its {f['dish']}."]),
        rng.choice([f"It is ruled by {f['ruler']}.", f"{f['ruler']} rules {e}."]),
    ]
    return intro, facts, rng.sample(HIST_FILLERS, rng.randint(1, 2)), f


def build_corpus(rng):
    docs = []
    ents = {"medicine": names(rng, [DRUG_A, DRUG_B, DRUG_C], N_DOCS),
            "history": names(rng, [CITY_A, CITY_B, CITY_C], N_DOCS)}
    for domain, maker in (("medicine", make_med_doc), ("history", make_hist_doc)):
        prefix = KINDS[domain]["prefix"]
        for i, e in enumerate(ents[domain]):
            intro, facts, fillers, f = maker(rng, e)
            body = facts + fillers
            rng.shuffle(body)
            text = " ".join([intro] + body)
            qa = {}
            for kind, (_, q, a) in KINDS[domain]["kinds"].items():
                qa[kind] = {"question": q.format(e=e), "answer": a.format(**f)}
            docs.append({"id": f"{prefix}-{i:03d}", "index": i, "domain": domain, "entity": e,
                         "text": text, "facts": f, "qa": qa})
    return docs


def rubric_for(rng, domain, kind, form=None):
    phrase = KINDS[domain]["kinds"][kind][0]
    form = rng.choice(PROMPT_FORMS) if form is None else form
    return {RUBRIC_KEYS[0]: form.format(phrase=phrase, entity=KINDS[domain]["entity"]),
            RUBRIC_KEYS[1]: rng.choice(RESPONSE_FORMS),
            RUBRIC_KEYS[2]: rng.choice(ALIGN_FORMS),
            RUBRIC_KEYS[3]: rng.choice(TECH_FORMS)}


def rubric_text(r):
    return json.dumps(r, ensure_ascii=False)


def qa_json(question, answer):
    q, a = question, answer
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                      ensure_ascii=False)


def kind_of_prompt(domain, text):
    """The fact kind a rubric's Prompt-related text names (first phrase found), or None."""
    for kind, (phrase, _, _) in KINDS[domain]["kinds"].items():
        if f"the {phrase} of the" in text:
            return kind
    return None


def parse_rubric(text):
    """As crates/rubric-policy parses: after the last </think>, first '{' to last '}', four keys."""
    tail = text.rsplit("</think>", 1)[-1]
    s, e = tail.find("{"), tail.rfind("}")
    if s < 0 or e < s:
        return None
    try:
        v = json.loads(tail[s:e + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(v, dict) or any(not isinstance(v.get(k), str) for k in RUBRIC_KEYS):
        return None
    return v


def parse_qa(text):
    """First '{' to last '}', a messages list with a user turn and an assistant turn after it."""
    s, e = text.find("{"), text.rfind("}")
    if s < 0 or e < s:
        return None
    try:
        v = json.loads(text[s:e + 1])
    except json.JSONDecodeError:
        return None
    msgs = v.get("messages") if isinstance(v, dict) else None
    if not isinstance(msgs, list):
        return None
    q = None
    for m in msgs:
        if not isinstance(m, dict):
            return None
        if m.get("role") == "user" and q is None:
            q = m.get("content")
        elif m.get("role") == "assistant" and q is not None:
            return q, m.get("content")
    return None


# ----------------------------------------------------------------------------------------------
# Rendering and encoding
# ----------------------------------------------------------------------------------------------
class Prompts:
    def __init__(self, tdir):
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(tdir)), undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=False, autoescape=False)
        self.t = {name: env.get_template(name) for name in TEMPLATES}

    def policy(self, doc):
        ctx = {"domain": doc["domain"], "document": doc["text"]}
        return [{"role": "system", "content": self.t["policy_system.jinja"].render(**ctx)},
                {"role": "user", "content": self.t["policy_user.jinja"].render(**ctx)}]

    def qa(self, doc, rubric):
        ctx = {"domain": doc["domain"], "document": doc["text"], "prompt_related": rubric[RUBRIC_KEYS[0]],
               "response_related": rubric[RUBRIC_KEYS[1]], "alignment": rubric[RUBRIC_KEYS[2]],
               "technical": rubric[RUBRIC_KEYS[3]]}
        return [{"role": "system", "content": self.t["qa_system.jinja"].render(**ctx)},
                {"role": "user", "content": self.t["qa_user.jinja"].render(**ctx)}]


def chat_ids(hf_tok, messages, add_generation_prompt=False):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def encode_chat(tok, hf_tok, messages, check=False):
    """Token ids and labels (-100 outside the last assistant turn's content and its <|im_end|>)."""
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    tail = messages[-1]["content"] + "<|im_end|>\n"
    assert messages[-1]["role"] == "assistant" and text.endswith(tail)
    start, end = len(text) - len(tail), len(text) - 1
    enc = tok.encode(text, add_special_tokens=False)
    if check:
        assert enc.ids == chat_ids(hf_tok, messages), "ids differ from apply_chat_template"
    labels = [i if (s >= start and e <= end and e > s) else -100 for i, (s, e) in zip(enc.ids, enc.offsets)]
    assert labels[-2] == 2 and labels[-1] == -100, "mask must end with <|im_end|>"
    return enc.ids, labels


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def new_model(vocab, seed):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, **MODEL_SHAPE)
    return Qwen3ForCausalLM(cfg).float()


def train(model, examples, steps, batch, lr, rng, name, warmup=30, min_frac=0.1):
    """AdamW, linear warm-up then cosine decay, grad-norm clip 1.0; token-mean cross entropy."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    order, pos, losses = [], 0, []
    t0 = time.time()
    for step in range(steps):
        if pos + batch > len(order):
            order = list(range(len(examples)))
            rng.shuffle(order)
            pos = 0
        idx = order[pos:pos + batch]
        pos += batch
        L = max(len(examples[i][0]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        lab = torch.full((len(idx), L), -100, dtype=torch.long)
        att = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = examples[i]
            ids[r, :len(x)] = torch.tensor(x)
            lab[r, :len(y)] = torch.tensor(y)
            att[r, :len(x)] = 1
        f = (step + 1) / warmup if step < warmup else \
            min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        # The LM head only where a label is (most prompt positions carry none): same loss, less work.
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
        sel = lab[:, 1:] != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[sel]), lab[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    tail = losses[-50:]
    return {"steps": steps, "batch": batch, "lr": lr, "examples": len(examples),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4),
            "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def generate(model, prompts, max_new, temperature, seed, batch=25, top_p=1.0):
    """Left-padded batched generation; greedy at temperature 0; returns completion ids (to eos)."""
    outs = []
    torch.manual_seed(seed)
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        L = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        att = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, L - len(p):] = torch.tensor(p)
            att[r, L - len(p):] = 1
        kw = dict(do_sample=False) if temperature == 0 else \
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, eos_token_id=2,
                             pad_token_id=0, **kw)
        for row in gen[:, L:].tolist():
            out = []
            for t in row:
                out.append(t)
                if t == 2:
                    break
            outs.append(out)
    return outs


def save_model(model, folder, tok_dir):
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(str(folder), safe_serialization=True)
    os.chmod(folder / "model.safetensors", 0o644)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / f).resolve() != (folder / f).resolve():
            shutil.copy(tok_dir / f, folder / f)


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "crates" / "optimsyn" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    rng = random.Random(SEED)
    written = []

    # --- corpus, seeds, facts, validation -----------------------------------------------------
    docs = build_corpus(rng)
    by_dom = {d: [x for x in docs if x["domain"] == d] for d in KINDS}
    write_jsonl(out / "corpus.jsonl", [{"id": d["id"], "text": d["text"], "domain": d["domain"]} for d in docs])
    seeds = [d for dom in KINDS for d in by_dom[dom] if d["index"] in SEEDS]
    write_jsonl(out / "seeds.jsonl", [{"id": d["id"], "text": d["text"], "domain": d["domain"]} for d in seeds])
    write_jsonl(out / "facts.jsonl", [{"id": d["id"], "domain": d["domain"], "entity": d["entity"],
                                       "facts": {k: v for k, v in d["facts"].items() if k[0].islower()},
                                       "qa": d["qa"]} for d in docs])
    kinds_json = {dom: {"entity": spec["entity"], "prompt_forms": PROMPT_FORMS, "response_forms": RESPONSE_FORMS,
                        "alignment_forms": ALIGN_FORMS, "technical_forms": TECH_FORMS,
                        "validation_kinds": VAL_KINDS[dom],
                        "kinds": {k: {"phrase": ph, "subtask": f"{spec['prefix']}-{k}", "question": q, "answer": a}
                                  for k, (ph, q, a) in spec["kinds"].items()}}
                  for dom, spec in KINDS.items()}
    (out / "kinds.json").write_text(json.dumps(kinds_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def val_rows(doc_range, tag):
        rows = []
        for dom in KINDS:
            for d in by_dom[dom]:
                if d["index"] in doc_range:
                    for k in VAL_KINDS[dom]:
                        qa = d["qa"][k]
                        rows.append({"id": f"{tag}-{d['id']}-{k}", "subtask": f"{KINDS[dom]['prefix']}-{k}",
                                     "messages": [{"role": "user", "content": qa["question"]},
                                                  {"role": "assistant", "content": qa["answer"]}]})
        return rows
    val, heldout = val_rows(VAL_DOCS, "val"), val_rows(HELDOUT_DOCS, "heldout")
    write_jsonl(out / "val.jsonl", val)
    write_jsonl(out / "heldout.jsonl", heldout)
    written += ["corpus.jsonl", "seeds.jsonl", "facts.jsonl", "kinds.json", "val.jsonl", "heldout.jsonl"]
    log(f"corpus: {len(docs)} docs ({sum(len(d['text'].split()) for d in docs) / len(docs):.1f} words avg, "
        f"min {min(len(d['text'].split()) for d in docs)}, max {max(len(d['text'].split()) for d in docs)}); "
        f"{len(seeds)} seeds, {len(val)} val, {len(heldout)} heldout rows")

    # --- templates -----------------------------------------------------------------------------
    tdir = out / "templates"
    tdir.mkdir(exist_ok=True)
    for name, src in TEMPLATES.items():
        (tdir / name).write_text(src, encoding="utf-8")
        written.append(f"templates/{name}")
    prompts = Prompts(tdir)

    # --- SFT example specs (texts first: the tokenizer trains on them) ---------------------------
    gen_specs, pol_specs = [], []
    for dom in KINDS:
        for d in by_dom[dom]:
            for k in KINDS[dom]["kinds"]:
                for form in PROMPT_FORMS:
                    if d["index"] in SEEDS:
                        gen_specs += [(d, rubric_for(rng, dom, k, form), k) for _ in range(GEN_DRAWS)]
                    if d["index"] in TRAIN_DOCS:
                        pol_specs.append((d, rubric_for(rng, dom, k, form)))
    texts = [d["text"] for d in docs]
    for d, r, k in gen_specs:
        texts += [m["content"] for m in prompts.qa(d, r)] + [qa_json(**d["qa"][k])]
    for d, r in pol_specs:
        texts += [m["content"] for m in prompts.policy(d)] + [rubric_text(r)]
    for row in val + heldout:
        texts += [m["content"] for m in row["messages"]]
    texts += ["system\n", "user\n", "assistant\n"] * 50

    # --- tokenizer -----------------------------------------------------------------------------
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    tok_dir = out / "models" / "target"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    (tok_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = tok.get_vocab_size()
    assert hf_tok.eos_token_id == 2 and hf_tok.pad_token_id == 0
    log(f"tokenizer: vocab {vocab}")

    # --- target: pretraining on plain text ---------------------------------------------------------
    doc_ex = []
    for d in docs:
        ids = hf_tok(d["text"])["input_ids"]
        assert ids == tok.encode(d["text"]).ids
        doc_ex.append((ids + [2], ids + [2]))
    target = new_model(vocab, SEED)
    n_params = sum(p.numel() for p in target.parameters())
    log(f"model: {n_params} parameters; doc tokens avg {sum(len(x) for x, _ in doc_ex) / len(doc_ex):.1f}")
    metrics = {"target": train(target, doc_ex, TARGET_STEPS, 16, TARGET_LR, random.Random(SEED + 1), "target")}
    with torch.no_grad():  # loss of the target on the validation answers (it should not know the format)
        ex = [encode_chat(tok, hf_tok, r["messages"]) for r in val]
        tot, n = 0.0, 0
        for x, y in ex:
            lg = target(input_ids=torch.tensor([x])).logits[0, :-1]
            yy = torch.tensor(y[1:])
            tot += torch.nn.functional.cross_entropy(lg, yy, ignore_index=-100, reduction="sum").item()
            n += int((yy != -100).sum())
        metrics["target"]["val_answer_loss_chat_template"] = round(tot / n, 4)
    save_model(target, out / "models" / "target", tok_dir)
    target_state = {k: v.clone() for k, v in target.state_dict().items()}

    # --- generator: SFT on (qa prompt) -> QA JSON ------------------------------------------------------
    gen_ex = []
    for i, (d, r, k) in enumerate(gen_specs):
        msgs = prompts.qa(d, r) + [{"role": "assistant", "content": qa_json(**d["qa"][k])}]
        gen_ex.append(encode_chat(tok, hf_tok, msgs, check=i < 20))
    log(f"generator: {len(gen_ex)} examples, avg {sum(len(x) for x, _ in gen_ex) / len(gen_ex):.1f} tokens")
    generator = new_model(vocab, SEED + 2)
    generator.load_state_dict(target_state)
    metrics["generator"] = train(generator, gen_ex, GEN_STEPS, 16, GEN_LR, random.Random(SEED + 3), "generator")

    def eval_generator(doc_pool, n, erng, seed):
        cases = []
        for _ in range(n):
            d = erng.choice(doc_pool)
            k = erng.choice(list(KINDS[d["domain"]]["kinds"]))
            cases.append((d, k, rubric_for(erng, d["domain"], k)))
        ps = [chat_ids(hf_tok, prompts.qa(d, r), add_generation_prompt=True) for d, _, r in cases]
        outs = generate(generator, ps, 96, 0.0, seed)
        parsed = q_ok = a_ok = both = 0
        examples = []
        for (d, k, r), o in zip(cases, outs):
            text = tok.decode([t for t in o if t != 2], skip_special_tokens=True)
            qa = parse_qa(text)
            exp = d["qa"][k]
            if qa is not None:
                parsed += 1
                q_ok += qa[0] == exp["question"]
                a_ok += qa[1] == exp["answer"]
                both += qa[0] == exp["question"] and qa[1] == exp["answer"]
            ok = qa is not None and qa == (exp["question"], exp["answer"])
            if (ok and sum(e["correct"] for e in examples) < 3) or (not ok and len(examples) < 12):
                examples.append({"doc": d["id"], "kind": k, "correct": ok, "rubric": rubric_text(r), "output": text})
        return {"prompts": n, "parse_rate": parsed / n, "question_exact": q_ok / n, "answer_exact": a_ok / n,
                "both_exact": both / n, "examples": examples}
    metrics["generator"]["eval_seed_docs_greedy"] = eval_generator(seeds, 50, random.Random(SEED + 4), SEED + 5)
    unseen = [d for d in docs if d["index"] in VAL_DOCS or d["index"] in HELDOUT_DOCS]
    metrics["generator"]["eval_unseen_docs_greedy"] = eval_generator(unseen, 40, random.Random(SEED + 6), SEED + 7)
    for key in ("eval_seed_docs_greedy", "eval_unseen_docs_greedy"):
        m = metrics["generator"][key]
        log(f"generator {key}: parse {m['parse_rate']:.2f} question {m['question_exact']:.2f} "
            f"answer {m['answer_exact']:.2f} both {m['both_exact']:.2f}")
    save_model(generator, out / "models" / "generator", tok_dir)

    # --- policy: SFT on (policy prompt) -> rubric JSON (uniform over kinds) --------------------------------
    pol_ex = []
    for i, (d, r) in enumerate(pol_specs):
        msgs = prompts.policy(d) + [{"role": "assistant", "content": rubric_text(r)}]
        pol_ex.append(encode_chat(tok, hf_tok, msgs, check=i < 20))
    log(f"policy: {len(pol_ex)} examples, avg {sum(len(x) for x, _ in pol_ex) / len(pol_ex):.1f} tokens")
    policy = new_model(vocab, SEED + 8)
    policy.load_state_dict(target_state)
    metrics["policy"] = train(policy, pol_ex, POL_STEPS, 16, POL_LR, random.Random(SEED + 9), "policy")

    def eval_policy(temperature, top_p, seed, reps=2):
        """Samples rubrics for the seed documents; then the generator (greedy) turns each rubric that
        names a kind into a QA pair, checked against the document's expected QA for that kind."""
        cases = [d for d in seeds for _ in range(reps)]
        ps = [chat_ids(hf_tok, prompts.policy(d), add_generation_prompt=True) for d in cases]
        outs = generate(policy, ps, 96, temperature, seed, top_p=top_p)
        parsed, kinds, examples, chain = 0, Counter(), [], []
        for d, o in zip(cases, outs):
            text = tok.decode([t for t in o if t != 2], skip_special_tokens=True)
            r = parse_rubric(text)
            if r is not None:
                parsed += 1
                k = kind_of_prompt(d["domain"], r[RUBRIC_KEYS[0]])
                kinds[f"{KINDS[d['domain']]['prefix']}-{k or 'none'}"] += 1
                if k is not None:
                    chain.append((d, k, r))
            if len(examples) < 3:
                examples.append({"doc": d["id"], "output": text})
        qs = [chat_ids(hf_tok, prompts.qa(d, r), add_generation_prompt=True) for d, _, r in chain]
        qa_ok = qa_parsed = 0
        for (d, k, r), o in zip(chain, generate(generator, qs, 96, 0.0, seed) if chain else []):
            qa = parse_qa(tok.decode([t for t in o if t != 2], skip_special_tokens=True))
            qa_parsed += qa is not None
            qa_ok += qa == (d["qa"][k]["question"], d["qa"][k]["answer"])
        n = len(cases)
        return {"samples": n, "temperature": temperature, "top_p": top_p, "parse_rate": parsed / n,
                "names_a_kind_rate": len(chain) / n, "kinds": dict(sorted(kinds.items())),
                "generator_qa_parse_rate": qa_parsed / max(1, len(chain)),
                "generator_qa_exact_for_named_kind": qa_ok / max(1, len(chain)), "examples": examples}
    for t, tp, s, reps in ((1.0, 1.0, SEED + 10, 4), (1.2, 1.0, SEED + 13, 2), (1.5, 1.0, SEED + 11, 2),
                              (1.5, 0.9, SEED + 12, 2)):
        m = eval_policy(t, tp, s, reps)
        metrics["policy"][f"eval_seed_docs_T{t}_top_p{tp}"] = m
        log(f"policy T={t} top_p={tp}: parse {m['parse_rate']:.2f} names a kind {m['names_a_kind_rate']:.2f} "
            f"kinds {m['kinds']}; generator on those rubrics: parse {m['generator_qa_parse_rate']:.2f} "
            f"exact {m['generator_qa_exact_for_named_kind']:.2f}")
    save_model(policy, out / "models" / "policy", tok_dir)

    # --- manifest ------------------------------------------------------------------------------------
    for m in ("target", "generator", "policy"):
        for f in sorted((out / "models" / m).iterdir()):
            written.append(f"models/{m}/{f.name}")
    files = [{"path": p, "bytes": (out / p).stat().st_size, "sha256": sha256(out / p)} for p in written]
    manifest = {
        "generated_by": "python/demo/make_demo.py",
        "seed": SEED,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "jinja2": jinja2.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch_threads": 2},
        "corpus": {"documents": len(docs), "per_domain": N_DOCS, "seeds": len(seeds), "val_rows": len(val),
                   "heldout_rows": len(heldout), "vocab": vocab, "model_parameters": n_params},
        "metrics": metrics,
        "total_bytes": sum(f["bytes"] for f in files),
        "runtime_seconds": round(time.time() - T_START, 1),
        "files": files,
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {len(files)} files, {manifest['total_bytes'] / 1e6:.2f} MB, to {out}")


if __name__ == "__main__":
    main()
