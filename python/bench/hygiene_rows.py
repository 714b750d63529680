"""Writes the files of the streaming check in docs/PERFORMANCE.md ("Data hygiene"): N candidate QA
rows (chat JSON) and M reference rows, with every 1000th candidate restating a reference question.

    python python/bench/hygiene_rows.py OUT_DIR [N=1000000] [M=10000]
    optimsyn data decontaminate --input OUT_DIR/candidates.jsonl --against OUT_DIR/reference.jsonl \
        --output /dev/null --rejected OUT_DIR/flagged.jsonl

Standard library only; the rows are a pure function of N and M.
"""

import json
import os
import sys

SUBJECTS = ["court", "statute", "tenant", "river", "drug", "rice", "bridge", "treaty"]


def reference_question(i):
    return f"What does the {SUBJECTS[i % 8]} numbered {i} say about appeals filed within {i % 97} days?"


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    m = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reference.jsonl"), "w") as f:
        for i in range(m):
            row = {"id": f"ref-{i}", "messages": [
                {"role": "user", "content": reference_question(i)},
                {"role": "assistant", "content": "It says the appeal is heard by the High Court."}]}
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, "candidates.jsonl"), "w") as f:
        for i in range(n):
            q = reference_question(i % m) if i % 1000 == 0 else \
                f"Under rule {i} of the {SUBJECTS[(i * 7) % 8]} code, who may appeal and to which body?"
            row = {"id": f"c-{i}", "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "The tenant may appeal to the Land Court within thirty days."}]}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
