"""Dataclass fields -> command-line flags. `--lora_rank 32` and `--lora_rank=32` both work."""
import argparse
import dataclasses


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {s!r}")


def parse(cls, argv=None):
    """Build an argparse parser from the dataclass `cls` (fields of type int, float, str, bool) and parse argv."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        typ = _bool if f.type is bool else f.type
        help_ = f.metadata.get("help", " ")  # a non-empty help makes argparse print the default
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=help_)
    return cls(**vars(p.parse_args(argv)))
