"""Dataclass fields -> command-line flags, and user errors as one clear line.

    args = parse(Args, presets={"toy": TOY_ARGS})     # --lora_rank 32 and --lora_rank=32 both work

- The help text of a flag is the comment beside its field (`lr: float = 1e-4  # peak learning rate`), read from
  the class source, so `--help` shows what the reader of the dataclass sees, with the default.
- No prefix matching: `--max_step 20` is an error, not a silent `--max_steps 20`.
- `presets`: {preset name: {field: default}}. When `--preset NAME` is given and NAME has a table, the table's values
  become the defaults before parsing, so any flag on the command line still wins.
"""
import argparse
import dataclasses
import inspect
import os
import re
import sys


class UserError(Exception):
    """A mistake of the user's (a flag, a path, a run folder): reported as one line, no traceback (see cli).
    `this_rank`: raised on this rank alone (e.g. one GPU out of memory) while the others may wait in a collective:
    cli prints it from this rank, whichever it is, and ends the process without the collective teardown."""

    def __init__(self, message, this_rank=False):
        super().__init__(message)
        self.this_rank = this_rank


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {s!r}")


def field_comments(cls):
    """{field name: the comment on its line} from the source of the dataclass `cls`."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#(.*)$", src, re.M)}


def parse(cls, argv=None, presets=None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls` (int, float, str, bool fields)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        typ = _bool if f.type is bool else f.type
        # a non-empty help makes argparse print the default; % must be escaped for its formatter
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=helps.get(f.name, " ").replace("%", "%%"))
    if presets:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--preset")
        name = pre.parse_known_args(argv)[0].preset
        if name in presets:
            p.set_defaults(**presets[name])
    return cls(**vars(p.parse_args(argv)))


def given_flags(argv=None):
    """The flag names written on the command line (`--lr 1` and `--lr=1` -> "lr")."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def cli(main):
    """Run main(); a UserError becomes `error: <message>` on stderr (once, from rank 0; a this_rank one of a run of
    several processes from its own rank, named, which then exits without any teardown) and exit code 2."""
    try:
        return main()
    except UserError as e:
        rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
        if e.this_rank and world > 1:
            # the others may be inside a collective this rank never joins: destroy_process_group would wait for them,
            # and so could the process groups' destructors at interpreter exit (one NCCL abort after another), so
            # the process ends here, at once; torchrun sees exit code 2 and stops the other ranks
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # already broken: we are exiting anyway
            pass
        sys.exit(2)


def prompts_from(arg):
    """--sample_prompts: prompts separated by |, or a text file with one prompt per line."""
    if not arg:
        return []
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [p.strip() for p in arg.split("|") if p.strip()]
