"""The run's log: one JSON object per line in <out_dir>/log.jsonl (the machine-readable record that tests and
users compare runs with), a short human line on stdout, and TensorBoard / W&B when installed and asked for."""
import json
import os


class RunLog:
    def __init__(self, out_dir, enabled=True, tensorboard=False, wandb_project="", config=None, start_step=0):
        """start_step: the step training (re)starts from. Lines of later steps (written after the checkpoint that
        is resumed, and so redone now) are dropped, so log.jsonl reads as one uninterrupted run."""
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.tb = self.wb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            keep = [r for r in read_log(out_dir) if r.get("step", 0) <= start_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(self.path + ".tmp", self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:
                print("tensorboard is not installed: pip install tensorboard (logging to log.jsonl only)")
        if wandb_project:
            try:
                import wandb
                self.wb = wandb.init(project=wandb_project, dir=out_dir, config=config)
            except ImportError:
                print("wandb is not installed: pip install wandb (logging to log.jsonl only)")

    def log(self, rec, echo=print):
        """Append `rec` to log.jsonl and pass one human line to `echo` (e.g. tqdm's bar.write; None: quiet)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        step = rec.get("step", 0)
        for k, v in rec.items():
            if self.tb and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wb:
            self.wb.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if echo:
            echo(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()


def read_log(out_dir):
    """The records of log.jsonl. A line that does not parse (the last append cut off by a kill or a full disk) is
    skipped, so --resume goes on from the checkpoint; the rewrite in RunLog drops it."""
    recs = []
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # an empty or cut-off line
    return recs
