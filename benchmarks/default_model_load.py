"""How long the default model takes to load: first conversion vs cached loads.

    python benchmarks/default_model_load.py [--runs 5]

Uses a fresh temporary cache. Each measurement runs in a new process, as a user's would:
- conversion: the first ``load_default_model()`` (GGUF -> cached safetensors folder, then load);
- cached load: ``load_default_model()`` in a new process, timed after importing the transformers
  modules any model load needs (``modeling_utils``, the Llama classes, the tokenizer backend);
- those imports, timed separately: every transformers script pays them once per process.
Prints the median of ``--runs`` processes for the cached figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_PROBE = """
import json, time
t0 = time.perf_counter()
import ivtrainer.modeling.loading as m
import transformers.modeling_utils, transformers.models.llama.modeling_llama, transformers.tokenization_utils_tokenizers
t1 = time.perf_counter(); m.load_default_model(); t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1}))
"""


def _probe(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "IVTRAINER_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        conversion = _probe(env)["load"]
        runs = [_probe(env) for _ in range(args.runs)]
    load = statistics.median(r["load"] for r in runs)
    imports = statistics.median(r["imports"] for r in runs)
    print(f"first load (GGUF -> cache, then load): {conversion:6.2f} s")
    print(f"cached load, model + tokenizer       : {load:6.2f} s  (median of {args.runs} processes)")
    print(f"imports of torch + transformers      : {imports:6.2f} s  (once per process, any HF script)")


if __name__ == "__main__":
    main()
