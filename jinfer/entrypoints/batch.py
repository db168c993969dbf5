"""`jinfer batch IN.jsonl OUT.jsonl`: offline batch inference over the engine.

Each input line is one JSON object: a prompt (`"prompt"`: text or token ids, or `"messages"`: a chat),
any `SamplingParams` field (`"logprobs"` and `"prompt_logprobs"` add fields of those names to the output),
and an optional `"id"` that is echoed back. Output line i answers input line i (results that finish out of
order wait in memory until the lines before them are written), so the output is always a prefix of the
answers, and a rerun resumes after the last complete line. A bad line becomes an output record with an
`"error"` that names the problem; the run goes on.

The engine is fed a window of lines at a time (its slots plus a waiting queue), never the whole file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jinfer.engine.outputs import RequestOutput, top_logprobs
from jinfer.inputs import SAMPLING_FIELDS, CheckedRequest, InputChecker

RECORD_FIELDS = ("id", "prompt", "messages")


@dataclasses.dataclass(frozen=True)
class BatchLine:
    index: int
    record_id: object  # the line's "id", echoed; None when absent
    request: CheckedRequest


def parse_line(inputs: InputChecker, index: int, line: str) -> BatchLine:
    """One input line -> a BatchLine, or ValueError naming the bad field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, not {type(obj).__name__}")
    unknown = sorted(set(obj) - set(SAMPLING_FIELDS) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected prompt or messages, id, and sampling fields "
                         f"{list(SAMPLING_FIELDS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give exactly one of 'prompt' (text or token ids) and 'messages' (a chat)")
    prompt = inputs.chat(obj["messages"]) if "messages" in obj else inputs.prompt(obj["prompt"])
    sampling = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    field = "messages" if "messages" in obj else "prompt"
    try:
        return BatchLine(index, obj.get("id"), inputs.request(prompt, sampling, field=field))
    except TypeError as e:  # a field of the wrong JSON type deep in validation
        raise ValueError(str(e)) from None


def output_record(line: BatchLine, out: RequestOutput) -> dict:
    rec = {"index": line.index, "id": line.record_id, "text": out.text, "token_ids": out.token_ids,
           "finish_reason": out.finish_reason,
           "usage": {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
                     "cached_prompt_tokens": out.num_cached_tokens}}
    if out.logprobs is not None:
        rec["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                            "top": [[t, v] for t, v in lp.top.items()]} for lp in out.logprobs]
    if out.prompt_logprobs is not None:
        # Per prompt token (null for the first): its own logprob and rank, and the top n as [id, logprob].
        n = line.request.sampling.prompt_logprobs
        rec["prompt_logprobs"] = [None] + [
            {"token_id": tok, "logprob": d[tok].logprob, "rank": d[tok].rank,
             "top": [list(tv) for tv in top_logprobs(d, n)]}
            for tok, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    m = out.metrics
    if m is not None and m.time_to_first_token is not None:
        rec["time_to_first_token_s"] = m.time_to_first_token
    return rec


def error_record(index: int, line: str, error: Exception) -> dict:
    record_id = None
    try:
        obj = json.loads(line)
        record_id = obj.get("id") if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        pass
    return {"index": index, "id": record_id, "error": str(error)}


def count_done(out_path: Path, expected: list[int]) -> int:
    """Complete records already in `out_path` (which must answer `expected` line indices in order); a
    partial last line from an interrupted run is cut off and redone."""
    if not out_path.exists():
        return 0
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out_path, "r+b") as f:
            f.truncate(end)
    raw_lines = data[:end].splitlines()
    if len(raw_lines) > len(expected):
        raise ValueError(f"{out_path} has {len(raw_lines)} records but only {len(expected)} lines are its to answer")
    for k, raw in enumerate(raw_lines):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{out_path}: line {k + 1} is not JSON; it is not an output of this command") from None
        if not isinstance(rec, dict) or rec.get("index") != expected[k]:
            raise ValueError(f"{out_path}: line {k + 1} is not record {expected[k]}; it is not an output of "
                             "this command")
    return len(raw_lines)


def host_path(out_path: Path, host: tuple[int, int]) -> Path:
    """Where host `index` of `count` writes its share of the output (the whole output for one host)."""
    index, count = host
    return out_path if count == 1 else out_path.with_name(f"{out_path.name}.host{index}-of-{count}")


def merge_host_outputs(in_path, out_path, count: int) -> None:
    """Interleaves the hosts' shares (host h answered lines h, h + count, ...) into one output in input
    order, atomically, then removes the shares. Run by one process once every host has finished."""
    in_path, out_path = Path(in_path), Path(out_path)
    n = len(read_lines(in_path))
    shares = []
    for h in range(count):
        path = host_path(out_path, (h, count))
        recs = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(recs) != len(range(h, n, count)):
            raise ValueError(f"{path} has {len(recs)} records; host {h} of {count} should have written "
                             f"{len(range(h, n, count))}")
        shares.append(recs)
    tmp = out_path.with_name(out_path.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(shares[i % count][i // count] + "\n")
    os.replace(tmp, out_path)
    for h in range(count):
        host_path(out_path, (h, count)).unlink()


def read_lines(in_path: Path) -> list[str]:
    with open(in_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    return lines


def run_batch(llm, in_path, out_path, window: int | None = None, progress: bool = True,
              host: tuple[int, int] = (0, 1)) -> dict:
    """Answers every line of `in_path` not yet answered; returns counts of what it did. With
    host=(index, count), answers lines index, index + count, ... into this host's share of the output
    (see merge_host_outputs); a merged output from an earlier run means there is nothing left to do."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"input file {in_path} does not exist")
    index, count = host
    if not 0 <= index < count:
        raise ValueError(f"host={host} must be (index, count) with 0 <= index < count")
    lines = read_lines(in_path)
    mine = list(range(index, len(lines), count))
    if count > 1 and out_path.exists():
        count_done(out_path, list(range(len(lines))))  # it must be this input's merged output
        return {"skipped": len(mine), "completed": 0, "errors": 0}
    path = host_path(out_path, host)
    done = count_done(path, mine)
    engine = llm.engine
    # Enough lines to keep every slot busy, never more than the waiting queue takes.
    window = window or min(engine.config.max_waiting, 5 * engine.config.max_slots * engine.config.data_parallel)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=done, desc="batch", unit="line")
    counts = {"skipped": done, "completed": 0, "errors": 0}
    ready: dict[int, dict] = {}  # position in `mine` -> a finished record waiting for those before it
    inflight: dict[str, tuple[int, BatchLine]] = {}
    todo = iter(range(done, len(mine)))
    next_out = done
    with open(path, "a", encoding="utf-8") as out:
        try:
            exhausted = False
            while True:
                while not exhausted and len(inflight) + len(ready) < window:
                    j = next(todo, None)
                    if j is None:
                        exhausted = True
                        break
                    i = mine[j]
                    try:
                        line = parse_line(engine.inputs, i, lines[i])
                        rid = engine.add_request(line.request, request_id=f"batch-{i}")
                        inflight[rid] = (j, line)
                    except Exception as e:
                        ready[j] = error_record(i, lines[i], e)
                        counts["errors"] += 1
                if not inflight and not ready:
                    break
                if inflight:
                    for ev in engine.step():
                        if ev.output.finished and ev.request_id in inflight:
                            j, line = inflight.pop(ev.request_id)
                            ready[j] = output_record(line, ev.output)
                            counts["completed"] += 1
                while next_out in ready:
                    out.write(json.dumps(ready.pop(next_out), ensure_ascii=False) + "\n")
                    next_out += 1
                    if bar:
                        bar.update(1)
                out.flush()
        finally:
            for rid in inflight:
                engine.cancel(rid)
            engine.run_until_done()  # the step already dispatched for cancelled requests
            os.fsync(out.fileno())
            if bar:
                bar.close()
    return counts
