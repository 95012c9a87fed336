from collections import Counter

from dynsparse.data.text import load_text

for name in ("english-sentences", "rotten-tomatoes"):
    for split in ("train", "test"):
        d = load_text(name, split)
        labels = dict(Counter(d.classes[y] for y in d.labels)) if d.labels else "unlabeled"
        print(f"{name:<18} {split:<5} {len(d):>6} texts  {labels}")
d = load_text("english-sentences", "train")
print(dict(Counter(d.sources)))
print(d.texts[5000])
d = load_text("rotten-tomatoes", "test")
print(d.classes[d.labels[0]], "|", d.texts[0])
