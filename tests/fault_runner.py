"""Run a task's ``train.main`` in this process and hit it with a real signal at a chosen point.

    python tests/fault_runner.py TASK FAULT AT [train arguments...]

TASK is classification, segmentation or detection. FAULT is one of

* ``kill-step``: SIGKILL this process when training step AT (counted from 1) starts;
* ``kill-save``: SIGKILL it in the middle of writing ``last.pth`` for the AT-th time, when half
  of the checkpoint's bytes are on disk;
* ``term-step`` / ``int-step``: send it SIGTERM / SIGINT during step AT (a polite stop).

The exit status is the trainer's (or -9 from the kill, as the parent sees it).
"""
import importlib
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import afan_harness.checkpoint  # noqa: E402

MODULES = {"classification": "Classification.train", "segmentation": "Segmentation.train",
           "detection": "Detection.train"}
SIGNALS = {"kill-step": signal.SIGKILL, "term-step": signal.SIGTERM, "int-step": signal.SIGINT,
           "int-twice": signal.SIGINT}


def main(task: str, fault: str, at: int, argv: list[str]) -> int:
    train = importlib.import_module(MODULES[task])
    count = [0]
    if fault == "kill-save":
        real_save = torch.save

        def half_written_then_killed(obj, file, *args, **kwargs):
            if Path(getattr(file, "name", "")).name.startswith("last.pth"):
                count[0] += 1
                if count[0] == at:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    file.write(buffer.getvalue()[: buffer.tell() // 2])
                    file.flush()
                    os.fsync(file.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, file, *args, **kwargs)

        afan_harness.checkpoint.torch.save = half_written_then_killed
    else:
        real_step = train.training_step

        def signalled_step(*args, **kwargs):
            count[0] += 1
            if count[0] == at:
                for _ in range(2 if fault == "int-twice" else 1):  # a second Ctrl-C: out at once
                    os.kill(os.getpid(), SIGNALS[fault])
            return real_step(*args, **kwargs)

        train.training_step = signalled_step
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
