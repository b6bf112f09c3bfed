"""Write the Quickstart's task: ISO dates to dtrain's house style, DD.MM.YYYY.

The prompt never says which format is wanted ("Convert the date 2023-04-15."), so the pretrained
model cannot know the answer ("15.04.2023"): its accuracy is near zero before training, and a LoRA
adapter learns the convention from examples. Train and held-out dates never coincide.

  python launch/make_dates.py dtrain/assets   # dates_train.jsonl (400), dates_eval.jsonl (50)
"""

import datetime
import json
import random
import sys
from pathlib import Path


def record(d: datetime.date) -> dict:
    prompt = f"Convert the date {d.isoformat()}."
    answer = d.strftime("%d.%m.%Y")
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "prompt": prompt,
        "response": answer,
    }


def main(out: Path, n_train: int = 400, n_eval: int = 50, seed: int = 0) -> None:
    rng = random.Random(seed)
    start, span = datetime.date(1950, 1, 1), (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), n_train + n_eval)
    dates = [start + datetime.timedelta(days=d) for d in days]
    for name, chunk in (("dates_train.jsonl", dates[:n_train]), ("dates_eval.jsonl", dates[n_train:])):
        lines = [json.dumps(record(d)) for d in chunk]
        (out / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "dtrain/assets"))
