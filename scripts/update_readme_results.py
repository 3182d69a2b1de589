"""Copy experiments/results/smollm2_methods.md into README.md between the results markers."""

from pathlib import Path

root = Path(__file__).resolve().parents[1]
readme, table = root / "README.md", (root / "experiments/results/smollm2_methods.md").read_text()
start, end = "<!-- results:start -->", "<!-- results:end -->"
text = readme.read_text()
head, rest = text.split(start)
_, tail = rest.split(end)
readme.write_text(f"{head}{start}\n{table}{end}{tail}")
