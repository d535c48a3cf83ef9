"""An lm-evaluation-harness task read with memory: notes into a memory, then a task from a local
directory of task YAMLs (the README's lm-eval example; needs `pip install 'longmem[lm-eval]'`).

    python examples/lm_eval_task.py notes.txt my_tasks/ my_task [--config my.yaml] [--set section.key=value ...]
"""

import argparse

import lm_eval
from lm_eval.tasks import TaskManager

from longmem.config import LongMemConfig
from longmem.lm_eval_model import LongMemLM
from longmem.model import LongMem


def main(lm: LongMem, notes: str, tasks_dir: str, task: str) -> None:
    lm.create_memory("notes")
    lm.append("notes", open(notes).read())
    results = lm_eval.simple_evaluate(model=LongMemLM(lm, memory_id="notes"), tasks=[task],
                                      task_manager=TaskManager(include_path=tasks_dir))
    print(results["results"][task])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notes")
    parser.add_argument("tasks_dir")
    parser.add_argument("task")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    main(LongMem(LongMemConfig.load(args.config, args.overrides)), args.notes, args.tasks_dir, args.task)
