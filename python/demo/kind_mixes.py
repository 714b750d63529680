"""Write candidate datasets that mix the demo's fact kinds differently, for `optimsyn analyze`.

    python python/demo/kind_mixes.py OUT_DIR

Dataset i asks, on every seed document of the demo (`seeds.jsonl`), the two fact kinds of pair i
of its domain (the 10 pairs of 5 kinds, the same index in both domains): 10 datasets of 96 QA
pairs written from `facts.jsonl`, from "both kinds validation asks" to "neither", without
looking at which kinds those are.
"""
import itertools
import json
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "crates" / "optimsyn" / "demo"


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    kinds = json.loads((DEMO / "kinds.json").read_text())
    pairs = {d: list(itertools.combinations(sorted(spec["kinds"]), 2)) for d, spec in kinds.items()}
    facts = {}
    for line in (DEMO / "facts.jsonl").read_text().splitlines():
        if line.strip():
            f = json.loads(line)
            facts[f["id"]] = f
    seeds = [json.loads(line)["id"] for line in (DEMO / "seeds.jsonl").read_text().splitlines() if line.strip()]
    for i in range(min(len(p) for p in pairs.values())):
        rows, names = [], {}
        for doc in seeds:
            f = facts[doc]
            pair = pairs[f["domain"]][i]
            names[f["domain"]] = "+".join(pair)
            for k in pair:
                qa = f["qa"][k]
                rows.append({"id": f"{doc}-{k}", "messages": [{"role": "user", "content": qa["question"]},
                                                              {"role": "assistant", "content": qa["answer"]}]})
        label = "_".join(f"{d}-{names[d]}" for d in sorted(names))
        path = out / f"mix-{i:02d}-{label}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(path)


if __name__ == "__main__":
    main(sys.argv)
