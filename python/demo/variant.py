"""Make a copy of the demo whose validation and held-out sets ask about other fact kinds.

    python python/demo/variant.py OUT medicine=year,side history=ruler,dish

OUT gets the demo's assets (symlinks to the bundled models, copies of everything else) with
`val.jsonl` (documents 130-139 of each domain) and `heldout.jsonl` (documents 140-149) rebuilt
from `facts.jsonl` for the named kinds, in the bundled files' format and subtask names. Then
`optimsyn demo --assets OUT` runs the demo against them. Nothing in the demo profile or the
program may depend on which kinds validation asks about; this is how that is checked.
"""
import json
import shutil
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "crates" / "optimsyn" / "demo"
VAL_DOCS, HELDOUT_DOCS = range(130, 140), range(140, 150)


def rows(facts, kinds, subtask, docs, tag):
    out = []
    for f in facts:
        index = int(f["id"].rsplit("-", 1)[1])
        if index not in docs:
            continue
        for k in kinds.get(f["domain"], []):
            qa = f["qa"][k]
            out.append({"id": f"{tag}-{f['id']}-{k}", "subtask": subtask[(f["domain"], k)],
                        "messages": [{"role": "user", "content": qa["question"]},
                                     {"role": "assistant", "content": qa["answer"]}]})
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out = Path(argv[1])
    kinds = {}
    for spec in argv[2:]:
        domain, _, names = spec.partition("=")
        kinds[domain] = [n for n in names.split(",") if n]
    catalogue = json.loads((DEMO / "kinds.json").read_text())
    subtask = {(d, k): v["subtask"] for d, spec in catalogue.items() for k, v in spec["kinds"].items()}
    for d, ks in kinds.items():
        for k in ks:
            if (d, k) not in subtask:
                sys.exit(f"unknown kind {d}={k}; kinds.json has {sorted(subtask)}")
    out.mkdir(parents=True, exist_ok=True)
    for p in DEMO.iterdir():
        target = out / p.name
        if target.exists() or target.is_symlink():
            continue
        if p.name == "models":
            target.symlink_to(p)
        elif p.is_dir():
            shutil.copytree(p, target)
        elif p.name not in ("val.jsonl", "heldout.jsonl"):
            shutil.copyfile(p, target)
    facts = [json.loads(line) for line in (DEMO / "facts.jsonl").read_text().splitlines() if line.strip()]
    for name, docs, tag in (("val.jsonl", VAL_DOCS, "val"), ("heldout.jsonl", HELDOUT_DOCS, "heldout")):
        data = rows(facts, kinds, subtask, docs, tag)
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
        print(f"{out / name}: {len(data)} rows")


if __name__ == "__main__":
    main(sys.argv)
