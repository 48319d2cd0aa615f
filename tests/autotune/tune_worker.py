"""One tuning worker, run as its own process by the distributed-tuning tests.

    python tune_worker.py STORAGE TRIALS

Tunes the causal example at a tiny shape under the interpreter with the fake timer, sharing the
study through STORAGE (a journal file or an RDB URL), and prints its result as JSON. The cache
folder comes from EINFLASH_CACHE_DIR, as for any einflash process.
"""

import json
import pathlib
import sys

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parent), str(pathlib.Path(__file__).resolve().parents[1])]

from autotune_helpers import FakeTimer, example, qkv  # noqa: E402

if __name__ == "__main__":
    storage, trials = sys.argv[1], int(sys.argv[2])
    result = example("causal").tune(*qkv(), trials=trials, storage=storage, timer=FakeTimer(), sampler="tpe")
    print(json.dumps(result.to_json()))
