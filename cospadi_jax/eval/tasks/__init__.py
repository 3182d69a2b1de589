"""lm-eval tasks shipped with the package, so that zero-shot accuracy can be measured offline.

``kjv_lambada``: 400 LAMBADA-style items over the held-out KJV books (Matthew-Acts, disjoint from calibration):
one or two sentences, and the model must predict their last word (four letters or more) greedily; ``acc`` is the
exact-match rate, ``perplexity`` that of the target word. Built by ``scripts/build_kjv_task.py`` (every item is
under 64 SmolLM2 tokens, so 400 items cost about 25k tokens of scoring). It is not a paper task: it gives an
accuracy-compression curve on a machine without the hub, nothing more.

lm-eval reads tasks from YAML files whose data paths must be absolute, so :func:`task_dir` writes the YAMLs,
pointing at the data files inside the installed package, into a directory once per process.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent
SHIPPED_TASKS = ("kjv_lambada",)

_LAST_WORD_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@lru_cache(maxsize=1)
def task_dir() -> str:
    """A directory holding the YAML of every shipped task (written once per process)."""
    out = Path(tempfile.mkdtemp(prefix="cospadi_tasks_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # no /tmp/cospadi_tasks_* left behind
    for name in SHIPPED_TASKS:
        data = DATA_DIR / f"{name}.jsonl"
        if not data.is_file():
            raise FileNotFoundError(f"shipped task data {data} is missing: reinstall cospadi-jax, or rebuild it "
                                    "with `python scripts/build_kjv_task.py`")
        (out / f"{name}.yaml").write_text(_LAST_WORD_YAML.format(name=name, data=data))
    return str(out)


def include_paths(tasks: list[str] | tuple[str, ...], include_path: str | None) -> list[str] | None:
    """lm-eval include paths for ``tasks``: the user's ``include_path`` plus the shipped tasks' directory
    when any shipped task is requested; None when neither is needed."""
    paths = [include_path] if include_path else []
    if any(t in SHIPPED_TASKS for t in tasks):
        paths.append(task_dir())
    return paths or None
