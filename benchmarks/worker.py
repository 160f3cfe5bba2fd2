"""Run one benchmark configuration in this process and print its result.

The driver (`run.py`) starts this script once per configuration, with
`KERAS_BACKEND` set, so that each measurement has a fresh process: peak
resident memory then belongs to that configuration alone. Usage:

    KERAS_BACKEND=jax python benchmarks/worker.py '{"kind": "train", ...}'

The result is printed as one line, `RESULT <json>`, on standard output.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULT_PREFIX = "RESULT "


def run(config):
    kind = config["kind"]
    if kind == "train":
        import training

        return training.run(config)
    if kind == "infer":
        import inference

        return inference.run(config)
    if kind == "hf_train":
        import hf_peft

        return hf_peft.run(config)
    if kind == "import":
        import imports

        return imports.run(config)
    raise ValueError(f"Unknown benchmark kind {kind!r}; expected train, infer, hf_train or import.")


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    try:
        result = run(config)
        result["ok"] = True
    except Exception as error:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
