"""Reads back what an offline W&B run wrote (its ``.wandb`` file), so tests can check the
summary and config spon-exp logged without a W&B server."""

from __future__ import annotations

from pathlib import Path


def _wandb_records(path):
    """Records of an offline ``.wandb`` run file (LevelDB log format behind a 7-byte W&B
    header); recent wandb versions keep the summary only there, not in a JSON file."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if (kind == 0 and length == 0) or len(payload) < length:  # end, or a record still being written
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST: one complete record
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _open_elsewhere(path) -> bool:
    """Whether some process (wandb's service) still holds ``path`` open: what it writes is not
    all on disk yet. Read from /proc; False where there is none."""
    import os

    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.path.realpath(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # a process that ended, or one we may not inspect
            continue
    return False


def read_offline_run(run_file) -> dict:
    """``{"summary": {...}, "config": {...}, "history": {key: [values]}}`` of an offline W&B run file.

    wandb's service process may still be writing the file when ``finish()`` has returned:
    wait until the run's ``exit`` record is on disk, or until no process holds the file open
    (then what it holds is all there is). No clock: the test's own timeout guards a hang."""
    import json
    import time

    records = list(_wandb_records(run_file))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and _open_elsewhere(run_file):
        time.sleep(0.2)
        records = list(_wandb_records(run_file))
    summary: dict = {}
    config: dict = {}
    history: dict = {}  # key -> the values logged under it, in order
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
            for item in record.run.summary.update:
                summary[item.key] = json.loads(item.value_json)
    config = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    return {"summary": summary, "config": config, "history": history}


def offline_run_file(run_dir) -> str:
    """The ``.wandb`` file of the run's offline W&B run; wandb's service may create it a moment
    after ``run()`` returned, so this waits for it (a hang is pytest-timeout's to end)."""
    import glob
    import time

    while True:
        found = glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "*.wandb"))
        if found:
            return found[0]
        time.sleep(0.2)
