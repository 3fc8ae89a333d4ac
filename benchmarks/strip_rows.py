"""Turntable strips of benchmark runs (the runs/*.npy records), one labelled row each, as one PNG.

  python benchmarks/strip_rows.py out.png "label=path/to/run.npy" ...
"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw

rows = [a.split("=", 1) for a in sys.argv[2:]]
label_w, pad = 260, 4
imgs = [(name, np.load(path)) for name, path in rows if Path(path).exists()]
h, w = imgs[0][1].shape[:2]
canvas = Image.new("RGB", (label_w + w, len(imgs) * (h + pad)), "white")
draw = ImageDraw.Draw(canvas)
for i, (name, strip) in enumerate(imgs):
    y = i * (h + pad)
    canvas.paste(Image.fromarray(strip), (label_w, y))
    draw.text((4, y + h // 2 - 6), name, fill="black")
canvas.save(sys.argv[1])
print(sys.argv[1], canvas.size)
