#!/usr/bin/env python3
"""LLaVA-format json (what vchat-synth writes) -> the jsonl of rounds that vchat-prep reads
and `vchat-chat --batch` evaluates: {"id", "rounds": [{"images": [...], "question", "answer"}]}.

Each human turn's "<image>" markers say how many of the record's images (in order) it
shows; the markers are dropped from the question. Image paths stay as they are (relative
to the json's directory, which is where vchat-chat --batch resolves them by default when
the jsonl is written next to it).

  /usr/bin/python3 tools/llava_to_jsonl.py IN.json OUT.jsonl
"""
import json
import sys


def convert(record):
    images = record.get("images") or ([record["image"]] if "image" in record else [])
    turns = record["conversations"]
    rounds, next_image = [], 0
    for human, gpt in zip(turns[0::2], turns[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"record {record.get('id')}: turns must alternate human, gpt")
        text = human["value"]
        n = text.count("<image>")
        question = text.replace("<image>\n", "").replace("<image>", "").strip()
        rounds.append({"images": images[next_image:next_image + n], "question": question, "answer": gpt["value"]})
        next_image += n
    if next_image != len(images):
        raise ValueError(f"record {record.get('id')}: {len(images)} images but {next_image} <image> markers")
    return {"id": record.get("id"), "rounds": rounds}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    with open(sys.argv[2], "w") as out:
        for r in data:
            out.write(json.dumps(convert(r)) + "\n")
    print(f"llava_to_jsonl: {len(data)} conversations -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
