"""Write the small click logs the user-data recipes read: ``examples/data/clicks.csv`` and
``examples/data/clicks.libfm`` (seeded; the committed files are this script's output).

Each row is one impression: a user, an item, the item's 1-3 tags (multi-hot), the hour, the device, the price and
the user's age, and whether it was clicked. Clicks follow a planted logistic model (per-id biases, a user-item
affinity, tag and hour effects), so a model can learn something and compression can cost something. The libFM
file holds the same impressions as one ``feature:1`` per field (user, item, hour, device; tags left out), with
global feature indices, the layout of Frappe-style releases.

    python examples/make_clicks.py            # rewrites both files
"""
from __future__ import annotations

import csv
import math
import os
import random

ROWS, USERS, ITEMS, TAGS, DEVICES = 3000, 400, 250, 30, 4
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def impressions(seed: int = 0) -> list[dict]:
    """The seeded impressions with their planted clicks."""
    rng = random.Random(seed)
    user_bias = [rng.gauss(0, 0.8) for _ in range(USERS)]
    item_bias = [rng.gauss(0, 0.8) for _ in range(ITEMS)]
    user_taste = [[rng.gauss(0, 1) for _ in range(4)] for _ in range(USERS)]
    item_style = [[rng.gauss(0, 1) for _ in range(4)] for _ in range(ITEMS)]
    item_tags = [rng.sample(range(TAGS), rng.randint(1, 3)) for _ in range(ITEMS)]
    tag_effect = [rng.gauss(0, 0.5) for _ in range(TAGS)]
    rows = []
    for _ in range(ROWS):
        user = min(int(rng.paretovariate(1.2)) - 1, USERS - 1)      # a few heavy users, a long tail
        item = min(int(rng.paretovariate(1.1)) - 1, ITEMS - 1)
        hour, device = rng.randrange(24), rng.randrange(DEVICES)
        price, age = round(rng.lognormvariate(3, 1), 2), rng.randint(16, 70)
        score = (user_bias[user] + item_bias[item] + sum(tag_effect[t] for t in item_tags[item])
                 + 0.6 * sum(a * b for a, b in zip(user_taste[user], item_style[item]))
                 + 0.4 * math.sin(hour / 24 * 2 * math.pi) - 0.3 * math.log(price) + 0.5)
        clicked = rng.random() < 1 / (1 + math.exp(-score))
        rows.append({"clicked": int(clicked), "user": f"u{user}", "item": f"i{item}",
                     "tags": "|".join(f"t{t}" for t in item_tags[item]), "hour": hour, "device": f"d{device}",
                     "price": price, "age": age})
    return rows


def write(rows: list[dict]) -> None:
    """Both files, each written to a temporary name and moved into place."""
    os.makedirs(HERE, exist_ok=True)
    path = os.path.join(HERE, "clicks.csv")
    with open(path + ".tmp", "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    os.replace(path + ".tmp", path)
    starts = {"user": 0, "item": USERS, "hour": USERS + ITEMS, "device": USERS + ITEMS + 24}
    path = os.path.join(HERE, "clicks.libfm")
    with open(path + ".tmp", "w") as f:
        for r in rows:
            features = [starts["user"] + int(r["user"][1:]), starts["item"] + int(r["item"][1:]),
                        starts["hour"] + r["hour"], starts["device"] + int(r["device"][1:])]
            f.write(("1" if r["clicked"] else "-1") + "".join(f" {i}:1" for i in features) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    write(impressions())
    print(f"wrote {ROWS} impressions to {HERE}/clicks.csv and clicks.libfm")
