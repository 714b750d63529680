"""Mean raw influence per validation subtask, by the fact kind a rollout's question asks.

    python python/demo/kind_influence.py RUN_DIR [RUN_DIR ...]

RUN_DIR is one run of `optimsyn demo` or `optimsyn train` on the demo world (e.g.
`/tmp/demo/seed-*/mean`). Every valid rollout of its GRPO steps (`rl/samples/step-*.jsonl`) is
classified by matching its question against the question forms in `kinds.json`; rows whose
question matches no form are counted as `other`. Prints a Markdown table: one row per kind, one
column per validation subtask, and the mean over subtasks (what mean aggregation pays).
"""
import collections
import glob
import json
import re
import statistics
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "crates" / "optimsyn" / "demo"


def question_forms(kinds_path):
    """(domain, kind, compiled regex) for every kind's question form."""
    spec = json.loads(Path(kinds_path).read_text())
    forms = []
    for domain, d in spec.items():
        for kind, k in d["kinds"].items():
            pattern = re.escape(k["question"]).replace(re.escape("{e}"), ".+")
            forms.append((domain, kind, re.compile(pattern, re.IGNORECASE)))
    return forms


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    forms = question_forms(DEMO / "kinds.json")
    by_kind = collections.defaultdict(list)
    for run in argv[1:]:
        for path in sorted(glob.glob(f"{run}/rl/samples/step-*.jsonl")):
            for line in open(path):
                row = json.loads(line)
                scores = row.get("subtask_influence")
                if not scores:
                    continue
                question = row["messages"][0]["content"].strip()
                kind = next(
                    (f"{d} {k}" for d, k, rx in forms if rx.fullmatch(question)), "other"
                )
                by_kind[kind].append(scores)
    if not by_kind:
        sys.exit("no scored rollouts under " + " ".join(argv[1:]))
    subtasks = sorted({s for rows in by_kind.values() for r in rows for s in r})
    print("| kind asked | rollouts | " + " | ".join(subtasks) + " | mean |")
    print("|---" * (len(subtasks) + 3) + "|")
    for kind, rows in sorted(by_kind.items()):
        cols = [statistics.mean(r.get(s, 0.0) for r in rows) for s in subtasks]
        cells = " | ".join(f"{c:.3f}" for c in cols)
        print(f"| {kind} | {len(rows)} | {cells} | {statistics.mean(cols):.3f} |")


if __name__ == "__main__":
    main(sys.argv)
