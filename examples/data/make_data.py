"""Write the example configs' local datasets (``python examples/data/make_data.py``):

- ``brackets_chat.jsonl``: the continual benchmark's ``brackets`` task (a made-up instruction the
  default model does not follow before training) as ``messages`` chats, one turn each.

``counterfact.json`` (8 capitals and a counterfactual new capital each, EasyEdit's CounterFact
fields) is written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from ivtrainer.continual.sequence_tasks import load_sequence_task

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = load_sequence_task("brackets", "train")
    chats = [
        {"messages": [{"role": "user", "content": r["prompt"].removesuffix("\nOutput:")},
                      {"role": "assistant", "content": r["output"]}]}
        for r in rows
    ]  # fmt: skip
    (HERE / "brackets_chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    print(len(chats), "chats")


if __name__ == "__main__":
    main()
